//! A real Redis Cluster per test: 3 masters with one replica each (or
//! more), each a `redis-server` child process on free ports with its data
//! in a temp dir, joined by `redis-cli --cluster create`. Killed on drop.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::RedisConnection;

use crate::{holds_within, wait_for};

const MASTERS: usize = 3;
/// Short, so a killed master's replica takes over within a few seconds.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// Client connections summed over a cluster's nodes (`INFO clients`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clients {
    pub connected: usize,
    pub blocked: usize,
}

struct Node {
    port: u16,
    bus_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // As docs/scaling.md advises: a failed master without a
            // replica stops only the slots it serves, not the whole cluster.
            .args(["--cluster-require-full-coverage", "no"])
            // Replicas sync at once instead of waiting 5 s for others to
            // share a diskless transfer; until synced they hold nothing.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(self.dir.path())
            // In its own directory, so a node that never answers explains why.
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} (install redis-server or set REDIS_SERVER): {e}")
            });
        self.child = Some(child);
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the node is running");
        crate::redis_server::send_signal(child, signal);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub port: u16,
    pub is_master: bool,
    pub failed: bool,
    /// Slot ranges served (masters only), inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// A master the cluster has not marked failed.
    pub fn is_live_master(&self) -> bool {
        self.is_master && !self.failed
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    }
}

pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts 3 masters with one replica each and waits until every slot is
    /// served and every node agrees the cluster is up.
    pub async fn start() -> Self {
        Self::start_with_replicas(1).await
    }

    /// Starts 3 masters with `replicas` replicas each.
    pub async fn start_with_replicas(replicas: usize) -> Self {
        let node_count = MASTERS * (1 + replicas);
        // Hold every listener until all ports are chosen, so none repeats;
        // two per node: clients and the cluster bus.
        let listeners: Vec<TcpListener> = (0..node_count * 2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        drop(listeners);
        let mut nodes: Vec<Node> = ports
            .chunks_exact(2)
            .map(|pair| Node {
                port: pair[0],
                bus_port: pair[1],
                dir: tempfile::tempdir().expect("a temp dir"),
                child: None,
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        let cluster = RedisCluster { nodes };
        for node in &cluster.nodes {
            let url = node.url();
            let answered = holds_within(Duration::from_secs(10), || async {
                ask_node::<String>(&url, redis::cmd("PING")).await.is_some()
            })
            .await;
            if !answered {
                let log = std::fs::read_to_string(node.dir.path().join("redis.log"))
                    .unwrap_or_else(|e| format!("(no log: {e})"));
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                panic!(
                    "the cluster node on port {} did not answer within 10 s; its log ends:\n{}",
                    node.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs (it comes with redis-server; apt install redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_healthy(Duration::from_secs(30)).await;
        cluster.wait_replicas_synced(Duration::from_secs(30)).await;
        cluster
    }

    /// Waits until every replica has finished its first sync and follows
    /// its master: before that a failover would promote a replica holding
    /// none of the recent writes.
    pub async fn wait_replicas_synced(&self, within: Duration) {
        let urls: Vec<String> = self.nodes.iter().map(Node::url).collect();
        wait_for("every replica to sync with its master", within, || {
            let urls = urls.clone();
            async move {
                for url in &urls {
                    let Some(info) = info_replication(url).await else {
                        return false;
                    };
                    let field = |name| protocol::info_field(&info, name);
                    if field("role") == Some("slave")
                        && (field("master_link_status") != Some("up")
                            || field("master_sync_in_progress") != Some("0"))
                    {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }

    /// The URL of every node started (seed nodes for the services).
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// A cluster connection for the test's own checks, waiting up to 30 s
    /// for a reply (a big XRANGE on a loaded machine).
    pub async fn connection(&self) -> RedisConnection {
        let client = redis::cluster::ClusterClient::builder(self.seed_urls())
            .response_timeout(Duration::from_secs(30))
            .build()
            .expect("valid seed urls");
        RedisConnection::Cluster(
            protocol::HealingCluster::connect(client)
                .await
                .expect("the test cluster accepts connections"),
        )
    }

    /// `CLUSTER <args>` answered by some live node.
    async fn ask_any_node<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(reply) = cluster_command(&node.url(), args).await {
                return reply;
            }
        }
        panic!("no cluster node answers CLUSTER {args:?}");
    }

    /// `CLUSTER NODES` as seen by a live node.
    pub async fn topology(&self) -> Vec<ClusterNode> {
        parse_cluster_nodes(&self.ask_any_node::<String>(&["NODES"]).await)
    }

    /// The cluster slot of `key`, as Redis computes it (CRC16 of its hash tag).
    pub async fn key_slot(&self, key: &str) -> u16 {
        self.ask_any_node(&["KEYSLOT", key]).await
    }

    /// The ports of the live masters and how many of `keys` each serves.
    pub async fn keys_per_master(&self, keys: &[String]) -> BTreeMap<u16, usize> {
        let topology = self.topology().await;
        let mut per_master: BTreeMap<u16, usize> = topology
            .iter()
            .filter(|n| n.is_live_master() && !n.slots.is_empty())
            .map(|n| (n.port, 0))
            .collect();
        for key in keys {
            let slot = self.key_slot(key).await;
            if let Some(port) = serving_master(&topology, slot) {
                *per_master.entry(port).or_default() += 1;
            }
        }
        per_master
    }

    /// The port of the master serving `key` as the cluster sees it now
    /// (a killed master still counts until the others mark it failed).
    pub async fn master_of(&self, key: &str) -> Option<u16> {
        let slot = self.key_slot(key).await;
        serving_master(&self.topology().await, slot)
    }

    /// CPU time each live master has used (`INFO cpu`), by port.
    pub async fn master_cpu_times(&self) -> BTreeMap<u16, Duration> {
        let mut times = BTreeMap::new();
        for node in self.topology().await.iter().filter(|n| n.is_live_master()) {
            let mut command = redis::cmd("INFO");
            command.arg("cpu");
            let url = format!("redis://127.0.0.1:{}", node.port);
            let info: String = ask_node(&url, command)
                .await
                .expect("a live master answers");
            let seconds: f64 = ["used_cpu_sys", "used_cpu_user"]
                .iter()
                .filter_map(|field| protocol::info_field(&info, field)?.parse::<f64>().ok())
                .sum();
            times.insert(node.port, Duration::from_secs_f64(seconds));
        }
        times
    }

    /// Each live master's port and the replicas connected to it (`INFO
    /// replication`); `None` for a master that does not answer.
    pub async fn replicas_per_master(&self) -> BTreeMap<u16, Option<usize>> {
        let mut replicas = BTreeMap::new();
        for node in self.topology().await.iter().filter(|n| n.is_live_master()) {
            let url = format!("redis://127.0.0.1:{}", node.port);
            let count = info_replication(&url).await.and_then(|info| {
                protocol::info_field(&info, "connected_slaves")?
                    .parse()
                    .ok()
            });
            replicas.insert(node.port, count);
        }
        replicas
    }

    /// Clients connected to the live nodes, and how many of them are blocked
    /// in a command (a blocking XREADGROUP), summed over the nodes. Each
    /// node also counts the connection that asks it.
    pub async fn clients(&self) -> Clients {
        let mut clients = Clients::default();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut command = redis::cmd("INFO");
            command.arg("clients");
            let Some(info) = ask_node::<String>(&node.url(), command).await else {
                continue;
            };
            // A reply this cannot read fails the test rather than count 0.
            let field = |name| {
                protocol::info_field(&info, name)
                    .and_then(|value| value.parse::<usize>().ok())
                    .unwrap_or_else(|| panic!("INFO clients has no readable {name}: {info}"))
            };
            clients.connected += field("connected_clients");
            clients.blocked += field("blocked_clients");
        }
        clients
    }

    /// How many nodes were started (masters and replicas).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The id of the node at `port` (`CLUSTER MYID`).
    pub async fn node_id(&self, port: u16) -> String {
        cluster_command(&format!("redis://127.0.0.1:{port}"), &["MYID"])
            .await
            .expect("the node answers")
    }

    /// Hands an empty `slot` to the master at `to_port`, as a resharding
    /// does once the slot's keys have moved: `CLUSTER SETSLOT slot NODE` on
    /// the new owner, then on every other master.
    pub async fn move_empty_slot(&self, slot: u16, to_port: u16) {
        let target = self.node_id(to_port).await;
        let mut masters: Vec<u16> = self
            .topology()
            .await
            .iter()
            .filter(|n| n.is_live_master())
            .map(|n| n.port)
            .collect();
        masters.sort_by_key(|port| *port != to_port);
        let slot = slot.to_string();
        for port in masters {
            let url = format!("redis://127.0.0.1:{port}");
            let moved: Option<()> =
                cluster_command(&url, &["SETSLOT", &slot, "NODE", &target]).await;
            moved.unwrap_or_else(|| panic!("the master at {port} takes SETSLOT"));
        }
    }

    /// SIGSTOPs the master serving `key` (a long stall: it keeps its
    /// connections and answers nothing); returns its port.
    pub async fn pause_master_of(&self, key: &str) -> u16 {
        let port = self
            .master_of(key)
            .await
            .expect("some master serves the slot");
        self.node(port).signal("-STOP");
        port
    }

    /// `CONFIG SET name value` on every live node.
    pub async fn set_config_everywhere(&self, name: &str, value: &str) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            self.set_config_on(node.port, name, value).await;
        }
    }

    /// `CONFIG SET name value` on the node at `port`.
    pub async fn set_config_on(&self, port: u16, name: &str, value: &str) {
        let mut command = redis::cmd("CONFIG");
        command.arg("SET").arg(name).arg(value);
        ask_node::<()>(&self.node(port).url(), command)
            .await
            .unwrap_or_else(|| panic!("CONFIG SET {name} on node {port}"));
    }

    /// `INFO section` of the node at `port`.
    pub async fn info_of(&self, port: u16, section: &str) -> String {
        let mut command = redis::cmd("INFO");
        command.arg(section);
        ask_node(&self.node(port).url(), command)
            .await
            .unwrap_or_else(|| panic!("INFO {section} on node {port}"))
    }

    /// SIGCONT after [`Self::pause_master_of`].
    pub fn resume(&self, port: u16) {
        self.node(port).signal("-CONT");
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("the node is one of ours")
    }

    /// SIGKILLs the master serving `key`; returns its port.
    pub async fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self
            .master_of(key)
            .await
            .expect("some master serves the slot");
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the master is one of ours")
            .kill();
        port
    }

    /// Starts the node at `port` again after [`Self::kill_master_of`], on
    /// its own data and `nodes.conf`: it rejoins the cluster as a replica
    /// of the node that took over its slots. Waits until it follows that
    /// node and every replica is in sync.
    pub async fn restart(&mut self, port: u16, within: Duration) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the node is one of ours");
        assert!(node.child.is_none(), "node {port} is still running");
        node.spawn();
        let url = node.url();
        // It starts as the master it was, until the cluster tells it
        // another node serves its slots now.
        wait_for(
            "the restarted node to follow its successor, in sync",
            within,
            || async {
                info_replication(&url).await.is_some_and(|info| {
                    let field = |name| protocol::info_field(&info, name);
                    field("role") == Some("slave")
                        && field("master_link_status") == Some("up")
                        && field("master_sync_in_progress") == Some("0")
                })
            },
        )
        .await;
        self.wait_healthy(within).await;
        self.wait_replicas_synced(within).await;
    }

    /// Waits until a live master other than `old_port` serves `key`: its
    /// replica was promoted.
    pub async fn wait_failover(&self, key: &str, old_port: u16, within: Duration) {
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect();
        wait_for("a replica to be promoted", within, || async {
            self.master_of(key)
                .await
                .is_some_and(|port| port != old_port && live.contains(&port))
        })
        .await;
        self.wait_healthy(within).await;
    }

    /// Waits until every live node reports the cluster up with all 16384
    /// slots served by live masters.
    pub async fn wait_healthy(&self, within: Duration) {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(Node::url)
            .collect();
        wait_for(
            "every cluster node to report the cluster up",
            within,
            || {
                let urls = urls.clone();
                async move {
                    for url in &urls {
                        let Some(info) = cluster_command::<String>(url, &["INFO"]).await else {
                            return false;
                        };
                        if protocol::info_field(&info, "cluster_state") != Some("ok")
                            || protocol::info_field(&info, "cluster_slots_ok") != Some("16384")
                        {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
    }
}

/// The port of the live master serving `slot` in `topology`.
fn serving_master(topology: &[ClusterNode], slot: u16) -> Option<u16> {
    topology
        .iter()
        .find(|n| n.is_live_master() && n.serves(slot))
        .map(|n| n.port)
}

/// `CLUSTER <args>` on one node; `None` if it does not answer.
async fn cluster_command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> Option<T> {
    let mut command = redis::cmd("CLUSTER");
    command.arg(args);
    ask_node(url, command).await
}

/// `INFO replication` of one node; `None` if it does not answer.
async fn info_replication(url: &str) -> Option<String> {
    let mut command = redis::cmd("INFO");
    command.arg("replication");
    ask_node(url, command).await
}

async fn ask_node<T: redis::FromRedisValue>(url: &str, command: redis::Cmd) -> Option<T> {
    let client = redis::Client::open(url).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_connection_timeout(Some(Duration::from_secs(2)));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()?;
    command.query_async(&mut con).await.ok()
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> <ping>
/// <pong> <epoch> <link> <slot ranges…>`.
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields.get(1)?;
            let port = address
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|range| !range.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                    None => range.parse().ok().map(|slot| (slot, slot)),
                })
                .collect();
            Some(ClusterNode {
                port,
                is_master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                slots,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_are_parsed() {
        let text = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b2 127.0.0.1:7001@17001 slave a1 0 0 1 connected\n\
                    c3 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected 5461 5462-10922\n";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert!(nodes[0].is_master && nodes[0].serves(5460) && !nodes[0].serves(5461));
        assert!(!nodes[1].is_master && nodes[1].slots.is_empty());
        assert!(nodes[2].failed && nodes[2].serves(5461) && nodes[2].serves(10922));
    }
}
