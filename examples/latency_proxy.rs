//! A TCP proxy that delays every byte sent towards the upstream by a fixed
//! time, for benchmarks on kernels without `tc netem`. Bytes keep flowing
//! while earlier ones wait, as on a network link: the delay adds latency
//! and does not limit throughput.
//!
//! Usage: `latency_proxy LISTEN UPSTREAM DELAY_MICROS`, for example
//! `latency_proxy 127.0.0.1:6380 127.0.0.1:6379 1000`. It runs until it is
//! killed. Replies from the upstream are passed on without delay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const CHUNK_BYTES: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: latency_proxy LISTEN UPSTREAM DELAY_MICROS");
        std::process::exit(2);
    }
    let delay = match args[3].parse::<u64>() {
        Ok(micros) => Duration::from_micros(micros),
        Err(err) => {
            eprintln!("latency_proxy: invalid delay {:?}: {err}", args[3]);
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(&args[1]).unwrap_or_else(|err| {
        eprintln!("latency_proxy: cannot listen on {}: {err}", args[1]);
        std::process::exit(1);
    });
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = args[2].clone();
        thread::spawn(move || {
            if let Err(err) = relay(client, &upstream, delay) {
                eprintln!("latency_proxy: connection to {upstream} failed: {err}");
            }
        });
    }
}

/// Relays one connection: delayed towards the upstream, direct back.
fn relay(client: TcpStream, upstream: &str, delay: Duration) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, server_write) = (client.try_clone()?, server.try_clone()?);
    thread::spawn(move || delayed_copy(client_read, server_write, delay));
    copy(server, client);
    Ok(())
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Reads on one thread and writes on another, each chunk no earlier than
/// `delay` after it was read.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (queue, chunks) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (due, chunk) in chunks {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if queue
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.join();
}
