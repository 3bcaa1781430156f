//! A tiny HTTP GET from inside a test network namespace (the agent's metrics and health
//! endpoints listen there). setns affects only the calling thread, so it runs on its own.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// Status code and body of `GET path` on `address` inside network namespace `netns`.
pub fn get_in_netns(netns: &str, address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let netns_path = format!("/run/netns/{netns}");
    let path = path.to_owned();
    std::thread::spawn(move || -> Result<(u16, String)> {
        let namespace =
            std::fs::File::open(&netns_path).with_context(|| format!("opening {netns_path}"))?;
        setns(namespace, CloneFlags::CLONE_NEWNET).context("entering the network namespace")?;
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("no status line in {response:?}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
    .join()
    .map_err(|_| anyhow!("the HTTP thread panicked"))?
}
