//! The path between the origin region and the destination broker: a network namespace joined
//! by a veth pair, cut with nftables drop rules, shaped with tc tbf (bandwidth) and nftables
//! (loss), and a userspace relay for latency (this kernel has no netem).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) {
    run(program, args).unwrap_or_else(|e| panic!("{e}"));
}

/// Why this machine cannot host the network scenarios, if it cannot.
pub fn unavailable() -> Option<String> {
    let probe = format!("ferry-probe-{}", std::process::id());
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!(
            "network namespaces unavailable ({e}); needs root and iproute2"
        ));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    if let Err(e) = run("nft", &["list", "tables"]) {
        return Some(format!(
            "nftables unavailable ({e}); install the nftables package"
        ));
    }
    None
}

pub struct Net {
    ns: String,
    host_if: String,
    ns_if: String,
    table: String,
    pub ns_ip: String,
}

impl Net {
    pub fn new() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id() % 250;
        let k = NEXT.fetch_add(1, Ordering::Relaxed) % 50;
        let id = format!("{n:x}x{k:x}");
        let subnet = format!("10.{}.{n}", 200 + k);
        let net = Net {
            ns: format!("ferry-chaos-{id}"),
            host_if: format!("fch{id}"),
            ns_if: format!("fcn{id}"),
            table: format!("ferry_chaos_{id}"),
            ns_ip: format!("{subnet}.2"),
        };
        let host_ip = format!("{subnet}.1/24");
        let _ = run("ip", &["netns", "del", &net.ns]);
        must("ip", &["netns", "add", &net.ns]);
        must(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &net.ns_if,
                "netns",
                &net.ns,
            ],
        );
        must("ip", &["addr", "add", &host_ip, "dev", &net.host_if]);
        must("ip", &["link", "set", &net.host_if, "up"]);
        let ns_addr = format!("{}/24", net.ns_ip);
        net.in_ns(&["ip", "addr", "add", &ns_addr, "dev", &net.ns_if]);
        net.in_ns(&["ip", "link", "set", &net.ns_if, "up"]);
        net.in_ns(&["ip", "link", "set", "lo", "up"]);
        net
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    fn in_ns(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns];
        all.extend_from_slice(args);
        must("ip", &all);
    }

    /// Drops every packet between this host and the namespace (a blackhole, as a real
    /// partition is: no resets, no unreachable errors).
    pub fn cut(&self) {
        self.rules(&[
            format!("ip daddr {} drop", self.ns_ip),
            format!("ip saddr {} drop", self.ns_ip),
        ]);
    }

    /// Removes every rule and qdisc.
    pub fn heal(&self) {
        let _ = run("nft", &["delete", "table", "inet", &self.table]);
        let _ = run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "tc",
                "qdisc",
                "del",
                "dev",
                &self.ns_if,
                "root",
            ],
        );
    }

    /// Bandwidth `mbit` each way and `loss_pct` % random packet loss each way.
    pub fn degrade(&self, mbit: u32, loss_pct: u32) {
        let rate = format!("{mbit}mbit");
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "32kbit", "latency", "400ms",
        ];
        let mut host = vec!["qdisc", "add", "dev", &self.host_if];
        host.extend_from_slice(&tbf);
        must("tc", &host);
        let mut ns = vec!["tc", "qdisc", "add", "dev", &self.ns_if];
        ns.extend_from_slice(&tbf);
        self.in_ns(&ns);
        if loss_pct > 0 {
            self.rules(&[
                format!(
                    "ip daddr {} numgen random mod 100 < {loss_pct} drop",
                    self.ns_ip
                ),
                format!(
                    "ip saddr {} numgen random mod 100 < {loss_pct} drop",
                    self.ns_ip
                ),
            ]);
        }
    }

    fn rules(&self, rules: &[String; 2]) {
        let _ = run("nft", &["delete", "table", "inet", &self.table]);
        let script = format!(
            "table inet {t} {{\n chain out {{ type filter hook output priority 0; {out}; }}\n chain inp {{ type filter hook input priority 0; {inp}; }}\n}}\n",
            t = self.table,
            out = rules[0],
            inp = rules[1]
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.table));
        std::fs::write(&path, script).expect("nft script");
        let applied = run("nft", &["-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        applied.unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.heal();
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// A TCP relay on loopback that delays the client-to-broker direction by `delay_ms ± jitter_ms`
/// per chunk, keeping byte order (a chunk is never sent before the one ahead of it).
pub async fn delay_relay(target: SocketAddr, delay_ms: u64, jitter_ms: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
    let addr = listener.local_addr().expect("relay addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut last = tokio::time::Instant::now();
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let j = rand::random_range(0..=2 * jitter_ms) as i64 - jitter_ms as i64;
                        let d = Duration::from_millis((delay_ms as i64 + j).max(0) as u64);
                        last = last.max(tokio::time::Instant::now() + d);
                        if tx.send((last, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((at, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(at).await;
                        if sw.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    addr
}
