//! A private single-node Apache Kafka cluster (KRaft, broker and controller in one JVM) per
//! broker of a scenario, so that restarting, stopping or cutting it off harms no other test.
//!
//! It runs from the classpath `ops/stack up` fetched (`ops/kafka/libs`, or `FERRY_KAFKA_LIBS`)
//! with `FERRY_JAVA` (else `java` on PATH).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The broker's classpath folder.
fn kafka_libs() -> PathBuf {
    std::env::var_os("FERRY_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::support::repo().join("ops/kafka/libs"))
}

fn java() -> PathBuf {
    std::env::var_os("FERRY_JAVA")
        .map(PathBuf::from)
        .unwrap_or_else(|| "java".into())
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
        std::fs::create_dir_all(dir.join("data")).expect("broker dir");
        let controller = SocketAddr::new(listen.ip(), free_port());
        let properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@{controller}\n\
             listeners=PLAINTEXT://{listen},CONTROLLER://{controller}\n\
             advertised.listeners=PLAINTEXT://{advertised}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             offsets.topic.replication.factor=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             num.recovery.threads.per.data.dir=1\n\
             background.threads=4\n\
             log.cleaner.threads=1\n",
            data = dir.join("data").display()
        );
        std::fs::write(dir.join("server.properties"), properties).expect("server.properties");
        std::fs::write(
            dir.join("log4j2.properties"),
            format!(
                "status = warn\nappender.file.type = File\nappender.file.name = file\n\
                 appender.file.fileName = {}\nappender.file.layout.type = PatternLayout\n\
                 appender.file.layout.pattern = [%d] %p %m (%c)%n\nrootLogger.level = info\n\
                 rootLogger.appenderRef.file.ref = file\n",
                dir.join("broker.log").display()
            ),
        )
        .expect("log4j2.properties");
        let mut b = Broker {
            name: name.into(),
            dir,
            listen,
            advertised,
            netns,
            child: None,
        };
        b.format();
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

    /// The broker's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn java(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(java());
                c
            }
            None => Command::new(java()),
        }
    }

    /// `kafka-storage format` with a fixed cluster id per broker name.
    fn format(&self) {
        // Cluster ids are 16 bytes in URL-safe base64 (22 characters).
        let id = match self.name.as_str() {
            "origin" => "Y2hhb3Mtb3JpZ2luLTAwMQ",
            _ => "Y2hhb3MtZGVzdGluYXRpbw",
        };
        let out = self
            .java()
            .arg("-cp")
            .arg(kafka_libs().join("*"))
            .args(["kafka.tools.StorageTool", "format", "-t", id, "-c"])
            .arg(self.dir.join("server.properties"))
            .arg("--ignore-formatted")
            .output()
            .unwrap_or_else(|e| panic!("running {} for kafka-storage: {e}", java().display()));
        assert!(
            out.status.success(),
            "formatting broker {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("broker stdout log");
        let lines_before = self.log_lines();
        let mut c = self.java();
        c.current_dir(&self.dir)
            .args([
                "-Xms384m",
                "-Xmx384m",
                "-XX:+UseG1GC",
                "-XX:ActiveProcessorCount=2",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(kafka_libs().join("*"))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(c.spawn().unwrap_or_else(|e| {
            panic!(
                "starting Kafka ({} -cp {}/*): {e}; run ops/stack up",
                java().display(),
                kafka_libs().display()
            )
        }));
        self.wait_ready(lines_before);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_lines(&self) -> usize {
        self.log_text().lines().count()
    }

    /// Ready: the log says "Kafka Server started" after this start, and the port answers.
    fn wait_ready(&mut self, lines_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let started = self
                .log_text()
                .lines()
                .skip(lines_before)
                .any(|l| l.contains("Kafka Server started"));
            if started
                && TcpStream::connect_timeout(&self.listen, Duration::from_millis(300)).is_ok()
            {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "broker {} exited during start-up ({st}); see {}",
                    self.name,
                    self.dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "broker {} not ready on {} within 90 s; see {}",
                self.name,
                self.listen,
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Graceful stop (SIGTERM, SIGKILL after 30 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
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
            // SIGKILL works on a stopped process too; CONT first anyway so it does not linger.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
