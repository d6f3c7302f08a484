//! Reads of references, batched per shard. Every destination with
//! `event_types` reads its own reference stream ([`crate::worker::routing`]),
//! and a read is a script (XREADGROUP of the references, then the events
//! behind them). With many such destinations each (shard, destination)
//! pair reads a few references at a time, so one script per pair and wake
//! cost Redis and the router more than the references themselves. Reads
//! of one shard go by group commit instead: while one script is on its way,
//! the reads asked for meanwhile gather, and the next script carries them
//! all, each group read on its own (`pcall`). A lone read goes at once, so
//! batching adds no wait. Every key of a shard shares its hash tag, so a
//! cluster runs the script on the shard's master.
//!
//! What each read gets back is its own: entries, or Redis's refusal of that
//! group's read (a missing group refuses only its reader). A failed script
//! fails every read it carried; each reader then reads its pending list
//! again, as after any failed read. A read runs only while its reader
//! surely holds the lease: one asked for too long ago to finish within the
//! lease's guarantee is answered [`RefReadError::Late`], unread.

use std::time::Duration;

use protocol::RedisConnection;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Most reads in one script: bounds a script's run and its reply.
const MAX_BATCH: usize = 64;

/// KEYS: the shard stream, then one reference stream per read. ARGV: our
/// consumer, then per read its group, count and where to read from (`>` or
/// an id). Per read, `{1, entries}`, each entry the reference's id with
/// the shard stream's fields of that id (nil when gone), or `{0, error}`.
const READ_REFS: &str = r"
local out = {}
for i = 2, #KEYS do
  local a = 2 + (i - 2) * 3
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[a], ARGV[1], 'COUNT', ARGV[a + 1], 'STREAMS', KEYS[i], ARGV[a + 2])
  if type(reply) == 'table' and reply.err then
    out[i - 1] = {0, reply.err}
  else
    local entries = {}
    if reply then
      for _, ref in ipairs(reply[1][2]) do
        local found = redis.call('XRANGE', KEYS[1], ref[1], ref[1])[1]
        table.insert(entries, {ref[1], found and found[2] or false})
      end
    end
    out[i - 1] = {1, entries}
  end
end
return out
";

/// Why a read of references got no entries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefReadError {
    /// The script failed; nothing is known of what it read.
    #[error("Redis: {0}")]
    Redis(String),
    /// Redis refused this group's read (e.g. `NOGROUP`).
    #[error("Redis refused the read: {0}")]
    Refused(String),
    /// Asked for too long ago to run within the reader's lease guarantee.
    #[error("the read waited too long to run under the lease")]
    Late,
    /// The shard's reads stopped (the router is stopping).
    #[error("the reads of references stopped")]
    Stopped,
}

/// One group's read.
pub struct RefRead {
    /// The reference stream.
    pub stream: String,
    pub group: String,
    pub count: usize,
    /// `>` or the id our pending entries are read after.
    pub from: String,
}

struct Request {
    read: RefRead,
    asked: Instant,
    answer: oneshot::Sender<Result<Value, RefReadError>>,
}

/// How long reads may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a reader's lease surely outlasts its asking.
    pub read_span: Duration,
    /// The longest a script's reply takes (the connection's timeout).
    pub reply_timeout: Duration,
}

/// The handle readers of one shard read through; its task runs until every
/// handle is dropped.
#[derive(Clone)]
pub struct RefReads {
    queue: mpsc::UnboundedSender<Request>,
}

impl RefReads {
    /// Starts the reads of the shard stream `events`, as `consumer`.
    pub fn start(
        connection: RedisConnection,
        events: String,
        consumer: String,
        timing: Timing,
    ) -> Self {
        let (queue, asked) = mpsc::unbounded_channel();
        let server = Server {
            connection,
            events,
            consumer,
            timing,
            script: Script::new(READ_REFS),
        };
        tokio::spawn(server.serve(asked));
        Self { queue }
    }

    /// Reads `read`; its entries as `[[id, [field, value, …] | nil], …]`.
    pub async fn read(&self, read: RefRead) -> Result<Value, RefReadError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Request {
                read,
                asked: Instant::now(),
                answer,
            })
            .map_err(|_| RefReadError::Stopped)?;
        answered.await.unwrap_or(Err(RefReadError::Stopped))
    }
}

struct Server {
    connection: RedisConnection,
    events: String,
    consumer: String,
    timing: Timing,
    script: Script,
}

impl Server {
    async fn serve(self, mut asked: mpsc::UnboundedReceiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while asked.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let runnable = self.runnable(&mut batch);
            if runnable.is_empty() {
                continue;
            }
            match self.run(&runnable).await {
                Ok(replies) => answer_each(runnable, replies),
                Err(error) => {
                    for request in runnable {
                        let _ = request.answer.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Takes from `batch` the reads to run now: not those whose reader
    /// stopped waiting, and not those that could end after the lease
    /// guarantee their reader had when asking (answered `Late`).
    fn runnable(&self, batch: &mut Vec<Request>) -> Vec<Request> {
        let latest_start = Instant::now() + self.timing.reply_timeout;
        let mut runnable = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            if request.answer.is_closed() {
                continue;
            }
            if request.asked + self.timing.read_span < latest_start {
                let _ = request.answer.send(Err(RefReadError::Late));
                continue;
            }
            runnable.push(request);
        }
        runnable
    }

    /// One script for every read in `batch`; one reply per read, in order.
    async fn run(&self, batch: &[Request]) -> Result<Vec<Value>, RefReadError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.key(&self.events).arg(&self.consumer);
        for Request { read, .. } in batch {
            invocation
                .key(&read.stream)
                .arg(&read.group)
                .arg(read.count)
                .arg(&read.from);
        }
        // EVALSHA; sent again as a whole only when Redis lacks the script
        // (NOSCRIPT: nothing ran), never after a lost reply.
        let reply: Value = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|error| RefReadError::Redis(error.to_string()))?;
        match reply {
            Value::Array(replies) if replies.len() == batch.len() => Ok(replies),
            other => Err(RefReadError::Redis(format!(
                "{} reads got the reply {other:?}",
                batch.len()
            ))),
        }
    }
}

/// Answers each read with its own part of the reply: `{1, entries}` or
/// `{0, error}`.
fn answer_each(batch: Vec<Request>, replies: Vec<Value>) {
    for (request, reply) in batch.into_iter().zip(replies) {
        let _ = request.answer.send(split(reply));
    }
}

fn split(reply: Value) -> Result<Value, RefReadError> {
    let Value::Array(mut parts) = reply else {
        return Err(RefReadError::Redis(format!("a read's reply is {reply:?}")));
    };
    let body = parts.pop();
    match (parts.pop(), body) {
        (Some(Value::Int(1)), Some(entries)) => Ok(entries),
        (Some(Value::Int(0)), Some(Value::BulkString(error))) => Err(RefReadError::Refused(
            String::from_utf8_lossy(&error).into_owned(),
        )),
        (flag, body) => Err(RefReadError::Redis(format!(
            "a read's reply is [{flag:?}, {body:?}]"
        ))),
    }
}
