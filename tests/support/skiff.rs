//! skiff's PostgreSQL pooler started inside the test process on a free
//! loopback port.

use std::sync::Arc;

use skiff::config::Config;
use skiff::pg::Pooler;
use tokio_util::sync::CancellationToken;

pub struct Skiff {
    pub port: u16,
    pub pooler: Arc<Pooler>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Skiff {
    /// Starts a pooler from a config text; its `listen` is ignored.
    pub async fn start(toml: &str) -> Skiff {
        Self::start_with_shipper(toml, None).await
    }

    /// Starts a pooler whose captured rows go to `shipper`.
    pub async fn start_with_shipper(toml: &str, shipper: Option<skiff::logship::Shipper>) -> Skiff {
        skiff::admin::install_recorder();
        let config = Config::parse(toml).expect("test config is valid");
        let pg = config.postgres.clone().expect("test config has [postgres]");
        let pooler = Pooler::new(pg, &config, shipper).expect("pooler starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        // Two session threads, so a server connection opened by one
        // thread's session is also borrowed by the other's.
        let threads = skiff::threads::SessionThreads::start("skiff-pg-test", 2).unwrap();
        let task = tokio::spawn(pooler.clone().serve(listener, threads, shutdown.clone()));
        Skiff {
            port,
            pooler,
            shutdown,
            task: Some(task),
        }
    }

    /// tokio-postgres connection string through skiff.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={dbname}",
            self.port
        )
    }

    /// Connects with tokio-postgres and drives the connection in the
    /// background.
    pub async fn connect(&self, user: &str, dbname: &str) -> tokio_postgres::Client {
        connect(&self.url(user, dbname)).await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect {url}: {err}"))
}

pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A config for one database on `pg_port` with the given extra lines in
/// `[postgres]`.
pub fn config(pg_port: u16, dbname: &str, postgres_extra: &str) -> String {
    format!(
        "[postgres]\nlisten = \"127.0.0.1:0\"\n{postgres_extra}\n\
         [[postgres.databases]]\nname = \"{dbname}\"\nhost = \"127.0.0.1\"\nport = {pg_port}\n"
    )
}

/// Renders every metric recorded in this test process as Prometheus text.
pub fn metrics_text() -> String {
    skiff::admin::install_recorder().render()
}
