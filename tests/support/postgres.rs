//! A PostgreSQL 15 server of the test's own, started with initdb and pg_ctl
//! on a free loopback port, with users for each auth method.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Data directories to stop when the test process exits.
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Users the server accepts, each tied to one auth method in pg_hba.conf.
pub const MD5_USER: (&str, &str) = ("md5user", "md5 secret");
pub const SCRAM_USER: (&str, &str) = ("scramuser", "scram'secret");
pub const CLEAR_USER: (&str, &str) = ("clearuser", "clear secret");

/// The server the tests of one test binary share, started on first use.
/// Each binary compiles this module on its own, so each has its own server.
pub fn shared() -> &'static PgServer {
    static SERVER: std::sync::OnceLock<PgServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

pub struct PgServer {
    pub port: u16,
    pub dir: PathBuf,
}

/// How a server differs from the default one.
#[derive(Default)]
pub struct PgOptions {
    /// Lines appended to postgresql.conf.
    pub conf: String,
    /// TCP lines of pg_hba.conf, replacing the default ones.
    pub hba: Option<String>,
    /// Files written into the data directory, owned by the server's user,
    /// as (name, contents, mode).
    pub files: Vec<(String, String, u32)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().expect("id -u runs");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// Runs a PostgreSQL binary as the postgres user when the tests run as
/// root, because PostgreSQL refuses to run as root.
fn pg_command(binary: &str) -> Command {
    let path = format!("{BIN}/{binary}");
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", &path]);
        command
    } else {
        Command::new(path)
    }
}

fn run(mut command: Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("{what}: cannot run: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

extern "C" fn stop_all_servers() {
    let dirs = RUNNING.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in dirs {
        let mut command = pg_command("pg_ctl");
        command.args([
            "-D",
            &dir.join("data").to_string_lossy(),
            "-m",
            "immediate",
            "stop",
        ]);
        let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl PgServer {
    /// Creates, configures and starts a new server.
    pub fn start() -> PgServer {
        PgServer::start_with(&PgOptions::default())
    }

    /// Creates, configures and starts a new server with `options`.
    pub fn start_with(options: &PgOptions) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("skiff-pg-")
            .tempdir()
            .unwrap()
            .keep();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres", &dir.to_string_lossy()]);
                    c
                },
                "chown",
            );
        }
        let port = free_port();
        let data = dir.join("data");
        let mut initdb = pg_command("initdb");
        initdb.args([
            "-D",
            &data.to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 200\npassword_encryption = 'scram-sha-256'\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        append(&data.join("postgresql.conf"), &options.conf);
        let hba = options.hba.clone().unwrap_or_else(|| {
            format!(
                "host all {} 127.0.0.1/32 md5\nhost all {} 127.0.0.1/32 scram-sha-256\n\
                 host all {} 127.0.0.1/32 password\nhost all all 127.0.0.1/32 trust\n",
                MD5_USER.0, SCRAM_USER.0, CLEAR_USER.0
            )
        });
        for (name, contents, mode) in &options.files {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
            if is_root() {
                let mut chown = Command::new("chown");
                chown.args(["postgres:postgres", &path.to_string_lossy()]);
                run(chown, "chown");
            }
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}"),
        )
        .unwrap();
        let server = PgServer { port, dir };
        server.pg_ctl("start");
        {
            let mut running = RUNNING.lock().unwrap();
            if running.is_empty() {
                unsafe { libc::atexit(stop_all_servers) };
            }
            running.push(server.dir.clone());
        }
        server.psql(&format!(
            "SET password_encryption = 'md5'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';\n\
             SET password_encryption = 'scram-sha-256'; CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';\n\
             CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}';",
            MD5_USER.0,
            MD5_USER.1,
            SCRAM_USER.0,
            SCRAM_USER.1.replace('\'', "''"),
            CLEAR_USER.0,
            CLEAR_USER.1
        ));
        server
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let mut command = pg_command("pg_ctl");
        command.args([
            "-D",
            &data.to_string_lossy(),
            "-l",
            &log.to_string_lossy(),
            "-w",
        ]);
        if action == "stop" {
            command.args(["-m", "immediate"]);
        }
        command.arg(action);
        run(command, &format!("pg_ctl {action}"));
    }

    /// Stops the server at once, as a crash would.
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start");
    }

    /// Runs SQL as the postgres superuser over the server's own socket.
    pub fn psql(&self, sql: &str) -> String {
        let output = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-XAtq",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Client connections the server has open to `db`, as PostgreSQL
    /// counts them.
    pub fn client_backends(&self, db: &str) -> usize {
        self.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = '{db}' AND backend_type = 'client backend'"
        ))
        .parse()
        .unwrap()
    }

    /// Creates a database of the test's own.
    pub fn create_database(&self, name: &str) {
        self.psql(&format!("CREATE DATABASE {name}"));
    }

    /// Connection string for connecting straight to the server.
    pub fn direct(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
