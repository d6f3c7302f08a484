//! Webhook "servers" that break HTTP itself, which an HTTP framework cannot
//! be made to do: they reset the connection mid-response or answer garbage.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy)]
pub enum Misbehaviour {
    /// Sends half a status line, then resets the connection (RST).
    ResetMidResponse,
    /// Answers bytes that are not HTTP, then closes.
    Garbage,
}

/// Serves `misbehaviour` on a free loopback port until the runtime ends;
/// returns its URL.
pub async fn spawn_hostile_server(misbehaviour: Misbehaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), socket.read(&mut request)).await;
                match misbehaviour {
                    Misbehaviour::ResetMidResponse => {
                        let _ = socket.write_all(b"HTTP/1.1 20").await;
                        let _ = socket.set_zero_linger();
                    }
                    Misbehaviour::Garbage => {
                        let _ = socket
                            .write_all(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
                            .await;
                        let _ = socket.shutdown().await;
                    }
                }
            });
        }
    });
    url
}
