//! The client-go contract program (`e2e/go/clientgo`, client-go at the version Rancher's
//! Steve in Harvester uses): built once per machine into the e2e binary cache, keyed by a
//! hash of its sources, and run by `e2e/tests/clientgo.rs`.
//!
//! The program prints one line per result (`PASS <check>: …`, `FAIL <check>: …`) and asks
//! the test to act with `STEP <name> [args]`, waiting for one line on its stdin (`ok
//! [value]` or `error <why>`); see its `main.go`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/go/clientgo");

/// FNV-1a over the module's files (names and contents, in name order): go.mod, go.sum and
/// every .go file.
fn sources_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "go")
                || p.file_name()
                    .is_some_and(|n| n == "go.mod" || n == "go.sum")
        })
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in &files {
        feed(f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        feed(&[0]);
        feed(&std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        feed(&[0]);
    }
    Ok(format!("{hash:016x}"))
}

fn go_command() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("go").is_file()));
    if on_path {
        PathBuf::from("go")
    } else {
        // Where .ci/run and the official tarball put it.
        PathBuf::from("/usr/local/go/bin/go")
    }
}

/// The built program, `<e2e bin cache>/clientgo-<hash>/clientgo`; built now if missing (a
/// cold build takes a minute or two on 2 cores, then it is reused). Concurrent callers
/// wait for one build.
pub fn binary() -> Result<PathBuf> {
    let src = Path::new(SOURCES);
    let dir = crate::bins::bin_dir()?.join(format!("clientgo-{}", sources_hash(src)?));
    let bin = dir.join("clientgo");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join(".lock"))?;
    lock.lock().context("locking the clientgo build")?;
    if bin.is_file() {
        return Ok(bin);
    }
    let tmp = dir.join(format!(".clientgo.tmp.{}", std::process::id()));
    let started = std::time::Instant::now();
    let out = std::process::Command::new(go_command())
        .current_dir(src)
        .env("GOTOOLCHAIN", "local")
        .env("GOWORK", "off")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .args(["build", "-trimpath", "-o"])
        .arg(&tmp)
        .arg(".")
        .output()
        .context("running `go build` for e2e/go/clientgo (is Go installed?)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "go build of e2e/go/clientgo failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &bin)?;
    let _ = writeln!(
        std::io::stderr(),
        "clientgo: built {} in {:.0} s",
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// One line of the program's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Pass(String),
    Fail(String),
    /// The program waits for [`Running::answer`].
    Step(String),
    Other(String),
}

/// A running check: read its lines, answer its steps.
pub struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pub stderr_log: PathBuf,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
}

/// Starts `clientgo <check> <args>`; its stderr (client-go's logs) goes to a file in the
/// run directory.
pub fn start(check: &str, args: &[String]) -> Result<Running> {
    let bin = binary()?;
    let run = crate::proc::run_dir()?;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stderr_log = run.join(format!("clientgo-{check}-{n}.log"));
    let stderr = std::fs::File::create(&stderr_log)?;
    let mut child = tokio::process::Command::new(bin)
        .arg(check)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .context("starting clientgo")?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("clientgo without pipes");
    };
    Ok(Running {
        child,
        stdin,
        stdout: BufReader::new(stdout).lines(),
        stderr_log,
        passed: Vec::new(),
        failed: Vec::new(),
    })
}

impl Running {
    /// The next line (results are also kept in `passed`/`failed`); None when the program
    /// ended. Fails if nothing comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Line>> {
        let line = match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(line) => line?,
            Err(_) => bail!("clientgo printed nothing for {timeout:?}"),
        };
        let Some(line) = line else {
            return Ok(None);
        };
        eprintln!("clientgo: {line}");
        Ok(Some(if let Some(rest) = line.strip_prefix("PASS ") {
            self.passed.push(rest.to_string());
            Line::Pass(rest.to_string())
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            self.failed.push(rest.to_string());
            Line::Fail(rest.to_string())
        } else if let Some(rest) = line.strip_prefix("STEP ") {
            Line::Step(rest.to_string())
        } else {
            Line::Other(line)
        }))
    }

    /// Answers the step the program waits on.
    pub async fn answer(&mut self, text: &str) -> Result<()> {
        self.stdin.write_all(format!("{text}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Waits for the program to exit: its status.
    pub async fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("clientgo did not exit within {timeout:?}"),
        }
    }

    /// The last `lines` lines of client-go's own log.
    pub fn stderr_tail(&self, lines: usize) -> String {
        crate::proc::log_tail(&self.stderr_log, lines)
    }
}
