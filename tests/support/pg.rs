//! Starts a throwaway PostgreSQL server for one test: `initdb` in a temp dir, `postgres` on a
//! free loopback port, stopped (and its directory removed) when dropped.
//!
//! As root it runs both as the `postgres` OS user (initdb refuses root). The server gets
//! `PR_SET_PDEATHSIG`, so a test process killed hard does not leave it running.
//! It never skips: without PostgreSQL installed it panics saying how to install it.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{free_tcp_port, wait_for};

/// A running PostgreSQL server.
pub struct PgServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, postgres) were not found. \
     Install them with `apt-get install -y postgresql` (the README's test command does this), \
     or point PG_BIN at the directory that holds them.";

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("postgres").exists())
        .collect();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return newest;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir);
        if p.join("initdb").exists() && p.join("postgres").exists() {
            return p.to_path_buf();
        }
    }
    panic!("{INSTALL_HINT}");
}

/// uid and gid of the `postgres` OS user, when we are root and must drop to it.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).unwrap_or_else(|| {
        panic!("running as root needs the `postgres` OS user to run initdb. {INSTALL_HINT}")
    });
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir("/");
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs `postgres` on the data in `dir` at `port`; returns once it accepts connections, or
/// the reason it exited.
fn spawn(bin: &Path, user: Option<(u32, u32)>, dir: &Path, port: u16) -> Result<Child, String> {
    let data = dir.join("data");
    let mut cmd = command(&bin.join("postgres"), user);
    cmd.args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
        .args(["-k", dir.to_str().unwrap()])
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
        .args(["-c", "max_connections=200"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log")).unwrap(),
        ));
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
    let ready = wait_for("postgres to accept connections", Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| Ok(()))
    });
    match ready {
        Ok(()) => Ok(child),
        Err(status) => Err(format!(
            "postgres exited with {status}: {}",
            fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        )),
    }
}

impl PgServer {
    /// Starts a server; panics with a clear message if it cannot.
    pub fn start() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir();
        let user = run_as();
        let dir = std::env::temp_dir().join(format!(
            "precall-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        if let Some((uid, gid)) = user {
            chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let data = dir.join("data");
        let out = command(&bin.join("initdb"), user)
            .args(["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--no-sync", "--locale=C"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}. {INSTALL_HINT}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_tcp_port();
            match spawn(&bin, user, &dir, port) {
                Ok(child) => {
                    let server = Self { child, dir, port };
                    server.wait_accepting_queries(&bin);
                    return server;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("could not start postgres: {last_err}");
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&mut self) {
        // A frozen server (a test that failed mid-freeze) would never act on SIGINT.
        self.signal_all(libc::SIGCONT);
        // SAFETY: the pid is our own child's, still unreaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }

    /// Freezes the server and all its backends (SIGSTOP): connections stay open and the
    /// kernel still acknowledges what is sent, but no query is answered: a hung database.
    #[allow(dead_code)]
    pub fn freeze(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    /// Lets a frozen server go on (SIGCONT).
    #[allow(dead_code)]
    pub fn thaw(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// Signals the postmaster and every process it started.
    fn signal_all(&self, sig: libc::c_int) {
        let parent = self.child.id();
        let mut pids = vec![parent];
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces.
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| {
                rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok())
            });
            if ppid == Some(parent) {
                pids.push(pid);
            }
        }
        for pid in pids {
            // SAFETY: our own child and its children.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// Starts the stopped server again on the same port with the same data.
    pub fn restart(&mut self) {
        let bin = bin_dir();
        self.child = spawn(&bin, run_as(), &self.dir, self.port)
            .unwrap_or_else(|e| panic!("could not restart postgres: {e}"));
        self.wait_accepting_queries(&bin);
    }

    fn wait_accepting_queries(&self, bin: &Path) {
        let isready = if bin.join("pg_isready").exists() {
            bin.join("pg_isready")
        } else {
            PathBuf::from("pg_isready")
        };
        wait_for("postgres to finish starting", Duration::from_secs(30), || {
            Command::new(&isready)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        });
    }

    /// A connection URL for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The one `bigint` a query such as `SELECT count(*) …` answers, on a connection of its own.
    #[allow(dead_code)]
    pub fn count(&self, sql: &str) -> i64 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
        })
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT = PostgreSQL's fast shutdown (a no-op on a stopped, reaped server).
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
