//! A raw protocol client, for message sequences that libraries do not
//! send: duplicate statement names, pgx-style pipelines, Close, Flush.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use skiff::pg::protocol;

pub struct RawClient {
    stream: TcpStream,
    buffer: BytesMut,
    pub process_id: i32,
    pub secret_key: i32,
}

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub tag: u8,
    pub body: Bytes,
}

impl Reply {
    /// SQLSTATE of an ErrorResponse.
    pub fn code(&self) -> String {
        protocol::ErrorFields::parse(&self.body).code
    }

    pub fn message(&self) -> String {
        protocol::ErrorFields::parse(&self.body).message
    }

    /// Text of the first column of a DataRow.
    pub fn first_value(&self) -> Option<String> {
        let mut body = &self.body[2..];
        let length = body.get_i32();
        (length >= 0).then(|| String::from_utf8_lossy(&body[..length as usize]).into_owned())
    }
}

fn message(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
    out.freeze()
}

fn cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

pub fn parse(name: &str, sql: &str) -> Bytes {
    let mut body = BytesMut::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.put_i16(0);
    message(b'P', &body)
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, statement: &str, params: &[&str]) -> Bytes {
    let mut body = BytesMut::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.put_i16(0);
    body.put_i16(params.len() as i16);
    for param in params {
        body.put_i32(param.len() as i32);
        body.put_slice(param.as_bytes());
    }
    body.put_i16(0);
    message(b'B', &body)
}

pub fn describe(kind: u8, name: &str) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u8(kind);
    cstr(&mut body, name);
    message(b'D', &body)
}

pub fn execute(portal: &str) -> Bytes {
    let mut body = BytesMut::new();
    cstr(&mut body, portal);
    body.put_i32(0);
    message(b'E', &body)
}

pub fn close(kind: u8, name: &str) -> Bytes {
    protocol::close(kind, name)
}

pub fn sync() -> Bytes {
    protocol::sync()
}

pub fn flush() -> Bytes {
    message(b'H', &[])
}

pub fn terminate() -> Bytes {
    message(b'X', &[])
}

pub fn query(sql: &str) -> Bytes {
    protocol::query(sql)
}

impl RawClient {
    /// Connects and logs in with trust auth.
    pub async fn connect(port: u16, user: &str, dbname: &str, extra: &[(&str, &str)]) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut client = RawClient {
            stream,
            buffer: BytesMut::new(),
            process_id: 0,
            secret_key: 0,
        };
        let mut params = vec![("user", user), ("database", dbname)];
        params.extend_from_slice(extra);
        client.send(&[protocol::startup_message(&params)]).await;
        loop {
            let reply = client.recv().await;
            match reply.tag {
                b'E' => panic!("login failed: {}", reply.message()),
                b'K' => {
                    let mut body = &reply.body[..];
                    client.process_id = body.get_i32();
                    client.secret_key = body.get_i32();
                }
                b'Z' => return client,
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, messages: &[Bytes]) {
        let joined: Vec<u8> = messages.concat();
        self.stream.write_all(&joined).await.unwrap();
    }

    /// Reads one message; panics after 10 s without one.
    pub async fn recv(&mut self) -> Reply {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.recv_inner())
            .await
            .expect("no reply within 10s")
    }

    async fn recv_inner(&mut self) -> Reply {
        loop {
            if self.buffer.len() >= 5 {
                let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() > length {
                    let mut frame = self.buffer.split_to(length + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Reply {
                        tag,
                        body: frame.freeze(),
                    };
                }
            }
            let read = self.stream.read_buf(&mut self.buffer).await.unwrap();
            assert!(read > 0, "connection closed by skiff");
        }
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn recv_until_ready(&mut self) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.recv().await;
            let done = reply.tag == b'Z';
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    /// True when the server closed the connection within 5 s.
    pub async fn is_closed(&mut self) -> bool {
        let mut probe = [0u8; 1024];
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.stream.read(&mut probe),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// The tags of a reply sequence, as a string such as "12nCZ".
pub fn tags(replies: &[Reply]) -> String {
    replies.iter().map(|r| r.tag as char).collect()
}
