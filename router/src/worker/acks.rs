//! Acknowledgements of one (shard, destination), written by group commit:
//! while one write is on its way to Redis, the outcomes that finish meanwhile
//! gather, and the next write carries them all (one XACK with every id, and
//! their delivery-log records, in one pipeline). An idle worker's lone
//! outcome goes at once, so batching adds no wait; under load a write
//! carries many, which saves a round trip, a reply and a wake-up per event.
//!
//! Each outcome's caller waits for the write that carries it, so a user's
//! next event still starts only after its predecessor's ack is in Redis.
//!
//! The XACK's own reply decides. A log record Redis refuses (`maxmemory`:
//! an XADD grows memory, an XACK does not) is lost with a warning, never
//! retried with its XACK: a failed log write must not cost a delivery.

use protocol::{RedisConnection, StreamId};
use redis::Cmd;
use tokio::sync::{mpsc, oneshot};

/// Most outcomes in one write: bounds the size of a command and its reply.
const MAX_BATCH: usize = 512;

/// Why an acknowledgement was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AckError {
    /// The write failed; nothing is known of what Redis did (XACK is
    /// idempotent, so writing it again is safe).
    #[error("Redis: {0}")]
    Redis(String),
    /// The writer stopped (its worker is ending).
    #[error("the acknowledgement writer stopped")]
    Stopped,
}

/// One outcome to acknowledge.
struct Ack {
    id: StreamId,
    /// Its delivery-log record (an XADD), written in the same round trip.
    record: Option<Cmd>,
    written: oneshot::Sender<Result<(), AckError>>,
}

/// The handle jobs acknowledge through; the writer task runs until every
/// handle is dropped.
pub struct AckWriter {
    queue: mpsc::UnboundedSender<Ack>,
}

impl AckWriter {
    /// Starts the writer of `group` on `stream`.
    pub fn start(connection: RedisConnection, stream: String, group: String) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(pending, connection, stream, group));
        Self { queue }
    }

    /// Acknowledges `id`, with its delivery-log `record`; returns once the
    /// write carrying it is answered.
    pub async fn ack(&self, id: StreamId, record: Option<Cmd>) -> Result<(), AckError> {
        let (written, answer) = oneshot::channel();
        self.queue
            .send(Ack {
                id,
                record,
                written,
            })
            .map_err(|_| AckError::Stopped)?;
        answer.await.unwrap_or(Err(AckError::Stopped))
    }
}

async fn write_batches(
    mut pending: mpsc::UnboundedReceiver<Ack>,
    connection: RedisConnection,
    stream: String,
    group: String,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let result = write(&mut batch, &connection, &stream, &group).await;
        for ack in batch.drain(..) {
            // The caller may have stopped waiting (shutdown).
            let _ = ack.written.send(result.clone());
        }
    }
}

/// One round trip: the XACK of every id in `batch`, then their log records.
async fn write(
    batch: &mut [Ack],
    connection: &RedisConnection,
    stream: &str,
    group: &str,
) -> Result<(), AckError> {
    let mut pipe = redis::pipe();
    // Each command's reply on its own: a refused record does not fail the XACK.
    pipe.ignore_errors();
    let xack = pipe.cmd("XACK").arg(stream).arg(group);
    for ack in batch.iter() {
        xack.arg(ack.id);
    }
    for ack in batch.iter_mut() {
        if let Some(record) = ack.record.take() {
            pipe.add_command(record);
        }
    }
    let replies: Vec<redis::RedisResult<redis::Value>> = pipe
        .query_async(&mut connection.clone())
        .await
        .map_err(|error| AckError::Redis(error.to_string()))?;
    let mut replies = replies.into_iter();
    let acked = replies
        .next()
        .unwrap_or_else(|| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no reply to XACK",
            )))
        })
        .map(drop)
        .map_err(|error| AckError::Redis(error.to_string()));
    let mut refused = replies.filter_map(Result::err);
    if let Some(error) = refused.next() {
        tracing::warn!(
            %stream,
            %group,
            records = 1 + refused.count(),
            %error,
            "Redis refused delivery-log records; the outcomes are acknowledged, their log lines lost."
        );
    }
    acked
}
