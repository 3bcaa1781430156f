//! Child processes that cannot outlive their test, and bounded waiting.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A child process that gets SIGKILL and is reaped when dropped, so a failing test never leaks it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub fn spawn(command: &mut Command, what: impl Into<String>) -> Result<Self> {
        let what = what.into();
        let child = command
            .spawn()
            .with_context(|| format!("spawning {what}: {command:?}"))?;
        Ok(Self { child, what })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"))
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).with_context(|| format!("sending {signal} to {}", self.what))
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.what))
    }

    /// Waits at most `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process (if it still runs) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // The process may exit between try_wait and kill; wait() below settles it either way.
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("reaping {}", self.what))
    }

    /// Asks the process to stop with `signal`, then SIGKILLs it after `grace`.
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.signal(signal);
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Lines read from a child's pipe by a background thread, visible while the child runs.
#[derive(Debug)]
pub struct LineCollector {
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl LineCollector {
    pub fn start(source: impl Read + Send + 'static) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("line sink poisoned").push(line);
            }
        });
        Self {
            lines,
            reader: Some(reader),
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("line sink poisoned").clone()
    }

    /// Waits until some line satisfies `accept`, at most `timeout`.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Option<String> {
        wait_until(timeout, Duration::from_millis(5), || {
            self.snapshot().into_iter().find(|line| accept(line))
        })
    }

    /// Every line, once the writer closed the pipe (the process exited or was killed).
    pub fn finish(mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.snapshot()
    }
}

/// Polls `probe` every `interval` until it returns `Some`, for at most `timeout`. The probe
/// runs at least once, and once more after the deadline would pass mid-sleep.
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// Runs `command` to completion with captured output, killing it if it exceeds `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{command:?}");
    let mut child = ChildGuard::spawn(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        what.clone(),
    )?;
    let stdout = LineCollector::start(child.child_mut().stdout.take().expect("piped"));
    let stderr = LineCollector::start(child.child_mut().stderr.take().expect("piped"));
    let Some(status) = child.wait_timeout(timeout)? else {
        child.kill()?;
        bail!(
            "{what} did not finish within {timeout:?}; stderr: {}",
            stderr.finish().join("\n")
        );
    };
    Ok(Output {
        status,
        stdout: join_lines(stdout.finish()).into_bytes(),
        stderr: join_lines(stderr.finish()).into_bytes(),
    })
}

/// Runs `command` and fails unless it exits successfully.
pub fn run_checked(command: &mut Command, timeout: Duration) -> Result<Output> {
    let output = run_bounded(command, timeout)?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(output)
}

fn join_lines(lines: Vec<String>) -> String {
    lines.into_iter().fold(String::new(), |mut text, line| {
        text.push_str(&line);
        text.push('\n');
        text
    })
}
