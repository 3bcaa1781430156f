//! The mirror's part for Maglev tables: which numbered table holds which content (backend ids
//! slot by slot), which masters point at each, and which tables nothing points at any more.
//! A table is found by its content, so frontends with the same backends share one table, and
//! a changed backend set gets a new table before any master points at it (make-before-break);
//! the old one is freed once no master uses it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

/// Maglev tables as programmed.
#[derive(Clone, Debug, Default)]
pub struct MaglevTables {
    /// Table number (1-based) → backend id of each slot.
    pub tables: BTreeMap<u32, Arc<[u32]>>,
    by_content: HashMap<Arc<[u32]>, u32>,
    /// Masters pointing at each table number.
    refs: HashMap<u32, u32>,
    /// Tables with content that no master points at.
    orphans: BTreeSet<u32>,
    next: u32,
}

impl PartialEq for MaglevTables {
    fn eq(&self, other: &Self) -> bool {
        self.tables == other.tables
    }
}

impl Eq for MaglevTables {}

impl MaglevTables {
    /// The table holding exactly this content, if any.
    pub fn with_content(&self, content: &[u32]) -> Option<u32> {
        self.by_content.get(content).copied()
    }

    /// Whether anything holds or points at a table number.
    pub fn in_use(&self, table: u32) -> bool {
        self.tables.contains_key(&table) || self.refs.contains_key(&table)
    }

    /// The first table number a plan may allocate: unused, at or after the cursor (numbers
    /// move forward, so a freed table is not refilled while a packet may still read it).
    pub fn cursor(&self) -> u32 {
        let mut table = self.next.max(1);
        while self.in_use(table) {
            table = table.checked_add(1).unwrap_or(1);
        }
        table
    }

    /// Tables no master points at.
    pub fn orphans(&self) -> &BTreeSet<u32> {
        &self.orphans
    }

    /// How many masters point at a table.
    pub fn refs(&self, table: u32) -> u32 {
        self.refs.get(&table).copied().unwrap_or(0)
    }

    pub fn upsert(&mut self, table: u32, content: &Arc<[u32]>) {
        if let Some(old) = self.tables.insert(table, content.clone())
            && self.by_content.get(&old) == Some(&table)
        {
            self.by_content.remove(&old);
        }
        self.by_content.entry(content.clone()).or_insert(table);
        self.next = self.next.max(table.wrapping_add(1));
        self.recheck(table);
    }

    pub fn delete(&mut self, table: u32) {
        if let Some(old) = self.tables.remove(&table)
            && self.by_content.get(&old) == Some(&table)
        {
            self.by_content.remove(&old);
            // Another table with the same content (left by an interrupted write) takes over.
            if let Some((other, _)) = self.tables.iter().find(|(_, content)| **content == old) {
                self.by_content.insert(old, *other);
            }
        }
        self.recheck(table);
    }

    /// A master moved from table `old` to table `new` (0: none).
    pub fn repoint(&mut self, old: u32, new: u32) {
        if old == new {
            return;
        }
        if old != 0 {
            let count = self.refs.entry(old).or_default();
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.refs.remove(&old);
            }
            self.recheck(old);
        }
        if new != 0 {
            *self.refs.entry(new).or_default() += 1;
            self.next = self.next.max(new.wrapping_add(1));
            self.recheck(new);
        }
    }

    fn recheck(&mut self, table: u32) {
        if self.tables.contains_key(&table) && !self.refs.contains_key(&table) {
            self.orphans.insert(table);
        } else {
            self.orphans.remove(&table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(ids: &[u32]) -> Arc<[u32]> {
        ids.into()
    }

    #[test]
    fn tables_are_found_by_content_and_orphaned_without_masters() {
        let mut tables = MaglevTables::default();
        tables.upsert(1, &content(&[1, 2, 1]));
        assert_eq!(tables.with_content(&[1, 2, 1]), Some(1));
        assert_eq!(tables.orphans().iter().copied().collect::<Vec<_>>(), [1]);
        tables.repoint(0, 1);
        tables.repoint(0, 1);
        assert!(tables.orphans().is_empty());
        assert_eq!(tables.refs(1), 2);
        tables.repoint(1, 0);
        assert!(tables.orphans().is_empty(), "one master still points at it");
        tables.repoint(1, 0);
        assert_eq!(tables.orphans().len(), 1);
        tables.delete(1);
        assert!(tables.orphans().is_empty());
        assert_eq!(tables.with_content(&[1, 2, 1]), None);
        assert_eq!(tables.cursor(), 2, "numbers move forward");
    }

    #[test]
    fn a_master_pointing_at_an_unknown_table_keeps_its_number_taken() {
        let mut tables = MaglevTables::default();
        tables.repoint(0, 5);
        assert!(tables.in_use(5));
        assert!(tables.orphans().is_empty());
        assert_eq!(tables.cursor(), 6);
    }
}
