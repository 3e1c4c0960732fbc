//! The skiff binary run as a child process with a config file.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct SkiffProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl SkiffProcess {
    /// Writes `config` to a file and starts skiff on it, waiting until
    /// `wait_port` accepts connections.
    pub fn start(config: &str, wait_port: u16) -> SkiffProcess {
        SkiffProcess::start_with(config, wait_port, &[], "debug")
    }

    /// Like `start`, with extra command-line arguments and `SKIFF_LOG` set
    /// to `log_level`.
    pub fn start_with(
        config: &str,
        wait_port: u16,
        args: &[&str],
        log_level: &str,
    ) -> SkiffProcess {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("skiff.toml");
        std::fs::File::create(&config_path)
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        let log = std::fs::File::create(dir.path().join("skiff.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("SKIFF_LOG", log_level)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("skiff binary starts");
        let process = SkiffProcess {
            child,
            dir,
            config_path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", wait_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "skiff did not listen: {}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("skiff.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

/// Waits up to `limit` for `child` to exit, and returns its status, or None
/// while it still runs.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for SkiffProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
