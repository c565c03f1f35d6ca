//! A private tansu broker per scenario, so that restarting, stopping or cutting it off harms
//! no other test.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: `FERRY_TANSU_BIN`, else `tansu` on PATH, else `$CARGO_HOME/bin/tansu`.
fn tansu_bin() -> PathBuf {
    if let Ok(b) = std::env::var("FERRY_TANSU_BIN") {
        return b.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        Path::new(&home).join("bin/tansu")
    })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Sends a signal (`-STOP`, `-CONT`, `-TERM`, `-KILL`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

pub struct Broker {
    pub name: String,
    dir: PathBuf,
    /// Where the broker binds.
    listen: SocketAddr,
    /// What it tells clients to connect to (a relay in front of it, say).
    advertised: String,
    /// Network namespace it runs in, if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl Broker {
    pub fn start(
        name: &str,
        dir: &Path,
        listen: SocketAddr,
        advertised: String,
        netns: Option<String>,
    ) -> Broker {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("broker dir");
        // tansu reads a .env from its working directory or any parent; an empty one here
        // keeps stray settings out.
        std::fs::write(dir.join(".env"), "").expect(".env");
        let mut b = Broker {
            name: name.into(),
            dir,
            listen,
            advertised,
            netns,
            child: None,
        };
        b.spawn();
        b
    }

    /// `host:port` for clients.
    pub fn bootstrap(&self) -> String {
        self.advertised.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("broker log");
        let url = format!("tcp://{}", self.listen);
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tansu_bin());
                c
            }
            None => Command::new(tansu_bin()),
        };
        c.current_dir(&self.dir)
            .args(["broker", "--cluster-id", &format!("chaos-{}", self.name)])
            .args(["--listener-url", &url])
            .args([
                "--advertised-listener-url",
                &format!("tcp://{}", self.advertised),
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(c.spawn().unwrap_or_else(|e| {
            panic!(
                "starting tansu ({}): {e}; run ops/stack up",
                tansu_bin().display()
            )
        }));
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect_timeout(&self.listen, Duration::from_millis(300)).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "broker {} exited during start-up ({st}); see {}/broker.log",
                    self.name,
                    self.dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "broker {} did not listen on {} within 60 s",
                self.name,
                self.listen
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Graceful stop (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker {} still runs", self.name);
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped broker ignores SIGKILL until continued? No: SIGKILL works on stopped
            // processes; CONT first anyway so it does not linger in the process table.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
