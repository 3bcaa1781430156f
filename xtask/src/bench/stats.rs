//! Summary statistics of the measurements: means, percentiles and paired ratios.

pub fn mean(values: &[f64]) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)] // sample counts far below 2^52
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // a rank between 1 and len
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 50.0)
}

/// Ratios of a mode's value to the baseline's in the same repetition, for the repetitions
/// where both were measured: pairing cancels the machine's drift between repetitions.
pub fn paired_ratios(mode: &[Option<f64>], baseline: &[Option<f64>]) -> Vec<f64> {
    mode.iter()
        .zip(baseline)
        .filter_map(|(&value, &base)| match (value, base) {
            (Some(value), Some(base)) if base > 0.0 => Some(value / base),
            _ => None,
        })
        .collect()
}

/// Median and range of paired ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioSummary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize_ratios(ratios: &[f64]) -> Option<RatioSummary> {
    Some(RatioSummary {
        median: median(ratios)?,
        min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
    }

    #[test]
    #[allow(clippy::float_cmp)] // exact by construction
    fn ratios_pair_repetitions_and_skip_missing_ones() {
        let mode = [Some(200.0), None, Some(330.0), Some(90.0)];
        let base = [Some(100.0), Some(100.0), Some(300.0), Some(100.0)];
        let ratios = paired_ratios(&mode, &base);
        assert_eq!(ratios, vec![2.0, 1.1, 0.9]);
        let summary = summarize_ratios(&ratios).unwrap();
        assert_eq!(summary.median, 1.1);
        assert_eq!((summary.min, summary.max), (0.9, 2.0));
        assert!(summarize_ratios(&[]).is_none());
    }
}
