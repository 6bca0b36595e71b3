//! Child processes that can never outlive the test process, and clean-up of whatever an
//! earlier run left behind (it may have been killed with SIGKILL).
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process:
//! test threads come and go, so every child is forked by one spawner thread that lives as
//! long as the process.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, anyhow};

/// Where every run keeps its files: `<root>/run-<pid>/`.
pub fn state_root() -> PathBuf {
    std::env::var_os("VM_DHCP_E2E_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vm-dhcp-e2e"))
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The channel lives in a static and is never closed: park forever so the
                // children's parent thread never exits.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the e2e spawner thread");
        Mutex::new(tx)
    })
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat): with
/// the pid it identifies a process even after pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// A child process with its output in a log file; killed when dropped.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr appended to `log`; the child gets SIGKILL when the
    /// test process dies, and its pid is recorded in `run_dir` for the next run's clean-up.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, run_dir: &Path) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    // The parent died before prctl took effect.
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| anyhow!("spawner lock poisoned"))?
            .send((cmd, tx))
            .map_err(|_| anyhow!("spawner thread is gone"))?;
        let child = rx
            .recv()
            .map_err(|_| anyhow!("spawner thread is gone"))?
            .with_context(|| format!("starting {name}"))?;
        record(
            run_dir,
            "pids",
            &format!("{} {}", child.id(), start_time(child.id()).unwrap_or(0)),
        );
        Ok(Process {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited? Returns the status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Appends a line to a bookkeeping file of the run (`pids`, `netns`).
pub fn record(run_dir: &Path, file: &str, line: &str) {
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(file))
    {
        let _ = writeln!(f, "{line}");
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what runs whose test process is gone left behind: their processes (checked by
/// start time, so a reused pid is never killed), their network namespaces and their files.
pub fn clean_stale_runs() {
    let Ok(entries) = fs::read_dir(state_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(owner) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let owner_start: Option<u64> = fs::read_to_string(path.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if pid_alive(owner) && start_time(owner) == owner_start {
            continue;
        }
        for line in fs::read_to_string(path.join("pids"))
            .unwrap_or_default()
            .lines()
        {
            let mut it = line.split_whitespace();
            let (Some(Ok(pid)), Some(Ok(start))) = (
                it.next().map(str::parse::<u32>),
                it.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            if start_time(pid) == Some(start) {
                // SAFETY: plain syscall on a pid we verified is the process we started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        for ns in fs::read_to_string(path.join("netns"))
            .unwrap_or_default()
            .lines()
        {
            let _ = Command::new("ip")
                .args(["netns", "delete", ns.trim()])
                .stderr(Stdio::null())
                .status();
        }
        for link in fs::read_to_string(path.join("links"))
            .unwrap_or_default()
            .lines()
        {
            let _ = Command::new("ip")
                .args(["link", "delete", link.trim()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&path);
    }
}

/// Creates this process's run directory, after cleaning up stale ones.
pub fn run_dir() -> Result<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.clone());
    }
    clean_stale_runs();
    let pid = std::process::id();
    let dir = state_root().join(format!("run-{pid}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join("owner"), start_time(pid).unwrap_or(0).to_string())?;
    Ok(DIR.get_or_init(|| dir).clone())
}
