//! A connection to the one cluster master that owns a key's slot.
//!
//! A worker's blocking reads (`XREADGROUP … BLOCK`) touch one stream, so
//! they need one node. A cluster client connects to every master, and a
//! router keeps a blocking connection per (shard, destination) pair: that
//! would be pairs × masters connections. [`SlotOwner`] connects only to the
//! master that `CLUSTER SLOTS` names for the key's slot, so a router needs
//! about pairs + nodes.
//!
//! It never retries a command by itself (see
//! `RedisConfig::connect_for_blocking_reads` for why). After a `MOVED` (a
//! failover or a resharding moved the slot), or once its connection failed,
//! it returns the error and forgets the connection; the next command
//! connects to the node the `MOVED` named, or to the owner `CLUSTER SLOTS`
//! names by then.

use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use tokio::sync::Mutex;

/// A node's address as the cluster announces it.
type Node = (String, u16);

/// A reconnecting connection to the master serving one key's slot. Cheap
/// to clone: clones share the connection.
#[derive(Clone)]
pub struct SlotOwner {
    inner: Arc<Inner>,
}

struct Inner {
    key: String,
    /// The configured seed nodes; their credentials and TLS settings are
    /// used for every node.
    seeds: Vec<ConnectionInfo>,
    /// For the owner's connection: replies may take a whole blocking read.
    reads: AsyncConnectionConfig,
    /// For asking a node who owns the slot.
    questions: AsyncConnectionConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connection: Option<MultiplexedConnection>,
    /// Where the last `MOVED` said the slot went.
    moved_to: Option<Node>,
    /// Every node the last `CLUSTER SLOTS` named: asked when no seed answers.
    known: Vec<Node>,
}

impl SlotOwner {
    /// Connects to the master owning `key`'s slot, learnt from the first of
    /// `seeds` that answers. `reads` configures that connection and
    /// `questions` the short ones that ask where the slot is.
    pub async fn connect(
        seeds: Vec<ConnectionInfo>,
        key: &str,
        reads: AsyncConnectionConfig,
        questions: AsyncConnectionConfig,
    ) -> RedisResult<Self> {
        if seeds.is_empty() {
            return Err(RedisError::from((
                ErrorKind::Client,
                "a cluster needs at least one seed node",
            )));
        }
        let owner = Self {
            inner: Arc::new(Inner {
                key: key.to_owned(),
                seeds,
                reads,
                questions,
                state: Mutex::new(State::default()),
            }),
        };
        owner.connection().await?;
        Ok(owner)
    }

    /// The connection to the owner, made first if there is none.
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut state = self.inner.state.lock().await;
        if let Some(connection) = &state.connection {
            return Ok(connection.clone());
        }
        let (host, port) = match state.moved_to.take() {
            Some(node) => node,
            None => self.ask_for_owner(&mut state).await?,
        };
        let connection = Client::open(self.node(&host, port))?
            .get_multiplexed_async_connection_with_config(&self.inner.reads)
            .await?;
        state.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Asks the seeds, then the nodes learnt last time, until one answers.
    async fn ask_for_owner(&self, state: &mut State) -> RedisResult<Node> {
        let known = state
            .known
            .iter()
            .map(|(host, port)| self.node(host, *port));
        let mut last_error = None;
        for node in self.inner.seeds.iter().cloned().chain(known) {
            match self.ask(node).await {
                Ok(Slots { owner, nodes }) => {
                    state.known = nodes;
                    return Ok(owner);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("there is at least one seed"))
    }

    async fn ask(&self, node: ConnectionInfo) -> RedisResult<Slots> {
        let asked = host_of(&node);
        let mut connection = Client::open(node)?
            .get_multiplexed_async_connection_with_config(&self.inner.questions)
            .await?;
        let (slot, slots): (u16, Value) = redis::pipe()
            .cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&self.inner.key)
            .cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await?;
        parse_slots(slots, slot, &asked)
    }

    /// The node at `host:port`, reached like the first seed.
    fn node(&self, host: &str, port: u16) -> ConnectionInfo {
        let seed = &self.inner.seeds[0];
        let addr = match seed.addr().clone() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        seed.clone().set_addr(addr)
    }

    /// Forgets the connection when the slot moved or the node is lost.
    async fn observe(&self, trouble: Option<Trouble>) {
        let Some(trouble) = trouble else { return };
        let mut state = self.inner.state.lock().await;
        state.connection = None;
        if let Trouble::Moved(to) = trouble {
            state.moved_to = to;
        }
    }
}

impl ConnectionLike for SlotOwner {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.connection().await?.req_packed_command(cmd).await;
            let trouble = match &result {
                Ok(value) => Trouble::in_reply(value),
                Err(error) => Trouble::of(error),
            };
            self.observe(trouble).await;
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .connection()
                .await?
                .req_packed_commands(pipeline, offset, count)
                .await;
            let trouble = match &result {
                Ok(values) => values.iter().find_map(Trouble::in_reply),
                Err(error) => Trouble::of(error),
            };
            self.observe(trouble).await;
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Why the connection must be made again.
enum Trouble {
    /// `MOVED` or `ASK`: another node serves the slot (named, normally).
    Moved(Option<Node>),
    /// The node did not answer or the connection broke.
    Lost,
}

impl Trouble {
    fn of(error: &RedisError) -> Option<Self> {
        if matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
        ) {
            // `(host:port, slot)`; an unknown endpoint (`?`) is asked for.
            let to = error
                .redirect_node()
                .and_then(|(address, _slot)| address.rsplit_once(':'))
                .filter(|(host, _)| !host.is_empty() && *host != "?")
                .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)));
            return Some(Trouble::Moved(to));
        }
        let lost = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal();
        lost.then_some(Trouble::Lost)
    }

    /// Error replies arrive as values; `MOVED` is one of them.
    fn in_reply(value: &Value) -> Option<Self> {
        match value {
            Value::ServerError(error) => Self::of(&error.clone().into()),
            _ => None,
        }
    }
}

fn host_of(node: &ConnectionInfo) -> String {
    match node.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    }
}

/// What `CLUSTER SLOTS` says about one slot.
#[derive(Debug, PartialEq, Eq)]
struct Slots {
    owner: Node,
    /// Every node named (masters and replicas).
    nodes: Vec<Node>,
}

/// Reads `[[start, end, [host, port, id, …], replica…], …]`. An empty host
/// means the node that answered.
fn parse_slots(reply: Value, slot: u16, asked: &str) -> RedisResult<Slots> {
    let malformed = |what: &str| {
        RedisError::from((
            ErrorKind::Parse,
            "unexpected CLUSTER SLOTS reply",
            what.to_owned(),
        ))
    };
    let Value::Array(ranges) = reply else {
        return Err(malformed("not an array"));
    };
    let mut owner = None;
    let mut nodes = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(malformed("a range is not an array"));
        };
        let [Value::Int(start), Value::Int(end), servers @ ..] = parts.as_slice() else {
            return Err(malformed("a range has no bounds"));
        };
        let servers = servers
            .iter()
            .map(|server| parse_node(server, asked).ok_or_else(|| malformed("a node")))
            .collect::<RedisResult<Vec<Node>>>()?;
        if (*start..=*end).contains(&i64::from(slot)) {
            owner = servers.first().cloned();
        }
        nodes.extend(servers);
    }
    nodes.sort();
    nodes.dedup();
    let owner = owner.ok_or_else(|| {
        RedisError::from((
            ErrorKind::Server(ServerErrorKind::ClusterDown),
            "no node serves the slot",
            slot.to_string(),
        ))
    })?;
    Ok(Slots { owner, nodes })
}

fn parse_node(server: &Value, asked: &str) -> Option<Node> {
    let Value::Array(fields) = server else {
        return None;
    };
    let host = match fields.first()? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?,
        Value::SimpleString(text) => text.as_str(),
        _ => return None,
    };
    let Value::Int(port) = fields.get(1)? else {
        return None;
    };
    let host = if host.is_empty() { asked } else { host };
    Some((host.to_owned(), u16::try_from(*port).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    fn range(start: i64, end: i64, servers: Vec<Value>) -> Value {
        let mut parts = vec![Value::Int(start), Value::Int(end)];
        parts.extend(servers);
        Value::Array(parts)
    }

    #[test]
    fn the_master_of_the_range_holding_the_slot_owns_it() {
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000), node("10.0.0.4", 7003)],
            ),
            range(5461, 10922, vec![node("", 7001), node("10.0.0.5", 7004)]),
        ]);
        let slots = parse_slots(reply.clone(), 5461, "seed").expect("parses");
        assert_eq!(
            slots.owner,
            ("seed".to_owned(), 7001),
            "empty host: the asked node"
        );
        assert_eq!(slots.nodes.len(), 4);
        let slots = parse_slots(reply.clone(), 5460, "seed").expect("parses");
        assert_eq!(slots.owner, ("10.0.0.1".to_owned(), 7000));
        let unserved = parse_slots(reply, 16000, "seed").expect_err("no owner");
        assert!(
            unserved.to_string().contains("no node serves"),
            "{unserved}"
        );
    }

    #[test]
    fn a_malformed_reply_is_an_error() {
        for reply in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![range(0, 10, vec![Value::Int(3)])]),
        ] {
            assert!(parse_slots(reply, 1, "seed").is_err());
        }
    }
}
