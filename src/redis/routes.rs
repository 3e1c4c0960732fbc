//! `[[redis.routes]]`: the routers of `[redis]` and of every route, and the
//! choice among them for a client's database and a command's keys.

use std::sync::Arc;

use bytes::Bytes;

use super::frame::Request;
use super::reply;
use super::router::Router;
use crate::config::{RedisConfig, MAIN_ROUTE};

/// Index of a router in [`Routes`]: 0 is `[redis]`, `i + 1` is route `i`.
pub type RouteId = usize;

/// The router of `[redis]`.
pub const MAIN: RouteId = 0;

/// A route's router and what it serves.
struct Route {
    name: String,
    database: Option<u32>,
    prefixes: Vec<Bytes>,
    upstream_database: u32,
    router: Arc<Router>,
}

/// Every router of the Redis job, each with its own topology, pools,
/// command table and dedicated connections.
pub struct Routes {
    main: Arc<Router>,
    routes: Vec<Route>,
    /// True when some route lists prefixes, so keys must be looked at.
    any_prefixes: bool,
}

impl Routes {
    /// Builds the router of `[redis]` and one per route; no connection is
    /// made yet.
    pub fn new(config: RedisConfig) -> Result<Routes, String> {
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let router = Router::new(config.for_route(route), &route.name)
                .map_err(|err| format!("[[redis.routes]] {:?}: {err}", route.name))?;
            routes.push(Route {
                name: route.name.clone(),
                database: route.database,
                prefixes: route
                    .prefixes
                    .iter()
                    .map(|prefix| Bytes::copy_from_slice(prefix.as_bytes()))
                    .collect(),
                upstream_database: route.upstream_database,
                router: Arc::new(router),
            });
        }
        let any_prefixes = routes.iter().any(|route| !route.prefixes.is_empty());
        let main = Arc::new(Router::new(config, MAIN_ROUTE)?);
        Ok(Routes {
            main,
            routes,
            any_prefixes,
        })
    }

    /// True when some route lists key prefixes.
    pub fn any_prefixes(&self) -> bool {
        self.any_prefixes
    }

    pub fn main(&self) -> &Arc<Router> {
        &self.main
    }

    /// True when no route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Returns every router, `[redis]` first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Router>> {
        std::iter::once(&self.main).chain(self.routes.iter().map(|route| &route.router))
    }

    pub fn router(&self, id: RouteId) -> &Arc<Router> {
        match id {
            MAIN => &self.main,
            _ => &self.routes[id - 1].router,
        }
    }

    pub fn name(&self, id: RouteId) -> &str {
        match id {
            MAIN => MAIN_ROUTE,
            _ => &self.routes[id - 1].name,
        }
    }

    /// Returns the database selected on the upstream connections of `id`
    /// for a client that selected `client_db`.
    pub fn upstream_db(&self, id: RouteId, client_db: u32) -> u32 {
        match id {
            MAIN => client_db,
            _ => self.routes[id - 1].upstream_database,
        }
    }

    /// Returns the route serving clients that selected `db`, if any.
    pub fn database_route(&self, db: u32) -> Option<RouteId> {
        self.routes
            .iter()
            .position(|route| route.database == Some(db))
            .map(|index| index + 1)
    }

    /// Returns the route whose prefixes the keys of `request` match,
    /// [`MAIN`] for keys no prefix matches, and `None` for a command
    /// without keys. Keys of different routes are the client's error.
    ///
    /// Channel names count as keys here, so `PUBLISH` and `SUBSCRIBE` to a
    /// channel under a route's prefix reach that route's servers, where
    /// the route's other clients subscribe and publish. Patterns of
    /// `PSUBSCRIBE` are matched as text.
    pub fn route_of_keys(&self, name: &str, request: &Request) -> Result<Option<RouteId>, Bytes> {
        if !self.any_prefixes {
            return Ok(None);
        }
        let args = &request.args;
        let positions: Vec<usize> = match name {
            "PUBLISH" | "SPUBLISH" => (1..args.len().min(2)).collect(),
            "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE"
            | "SUNSUBSCRIBE" => (1..args.len()).collect(),
            _ => self.main.commands().key_positions(name, request),
        };
        let mut found: Option<RouteId> = None;
        for key in positions.iter().filter_map(|&index| args.get(index)) {
            let id = self.route_of_key(key);
            match found {
                None => found = Some(id),
                Some(first) if first == id => {}
                Some(first) => return Err(self.cross_route_error(first, id)),
            }
        }
        Ok(found)
    }

    fn route_of_key(&self, key: &[u8]) -> RouteId {
        self.routes
            .iter()
            .position(|route| route.prefixes.iter().any(|prefix| key.starts_with(prefix)))
            .map_or(MAIN, |index| index + 1)
    }

    /// Returns the error for one request whose keys belong to routes `a`
    /// and `b`. The code is CROSSSLOT, which clients already treat as
    /// "these keys cannot be used together", and the text names the routes.
    pub fn cross_route_error(&self, a: RouteId, b: RouteId) -> Bytes {
        reply::error(&format!(
            "CROSSSLOT Keys in request don't hash to the same slot: they belong to \
             skiff routes {:?} and {:?}",
            self.name(a),
            self.name(b)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routes() -> Routes {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\n\
                    [[redis.routes]]\nname = \"celery\"\ndatabase = 1\n\
                    prefixes = [\"celery\", \"_kombu.\"]\nnodes = [\"127.0.0.1:7001\"]\n\
                    [[redis.routes]]\nname = \"jobs\"\ndatabase = 2\nupstream_database = 5\n\
                    nodes = [\"127.0.0.1:7002\"]\n";
        Routes::new(Config::parse(text).unwrap().redis.unwrap()).unwrap()
    }

    fn request(args: &[&str]) -> Request {
        let args = args
            .iter()
            .map(|arg| Bytes::copy_from_slice(arg.as_bytes()))
            .collect();
        Request::from_args(args)
    }

    fn route_of(routes: &Routes, args: &[&str]) -> Result<Option<RouteId>, Bytes> {
        let request = request(args);
        routes.route_of_keys(&request.name(), &request)
    }

    #[test]
    fn keys_pick_their_route() {
        let routes = routes();
        assert_eq!(
            route_of(&routes, &["GET", "celery-task-meta-1"]),
            Ok(Some(1))
        );
        assert_eq!(route_of(&routes, &["GET", "other"]), Ok(Some(MAIN)));
        assert_eq!(route_of(&routes, &["PING"]), Ok(None));
        assert_eq!(
            route_of(&routes, &["BRPOP", "celery", "_kombu.binding.x", "1"]),
            Ok(Some(1))
        );
        assert_eq!(
            route_of(&routes, &["PUBLISH", "celery-task-meta-2", "m"]),
            Ok(Some(1))
        );
        assert_eq!(route_of(&routes, &["SUBSCRIBE", "news"]), Ok(Some(MAIN)));
    }

    #[test]
    fn keys_of_two_routes_are_an_error() {
        let routes = routes();
        let err = route_of(&routes, &["MGET", "celery-a", "other"]).unwrap_err();
        let text = String::from_utf8_lossy(&err);
        assert!(text.starts_with("-CROSSSLOT "), "{text}");
        assert!(text.contains("\"celery\" and \"main\""), "{text}");
    }

    #[test]
    fn databases_pick_their_route() {
        let routes = routes();
        assert_eq!(routes.database_route(1), Some(1));
        assert_eq!(routes.database_route(2), Some(2));
        assert_eq!(routes.database_route(0), None);
        assert_eq!(routes.upstream_db(2, 2), 5);
        assert_eq!(routes.upstream_db(1, 1), 0);
        assert_eq!(routes.upstream_db(MAIN, 3), 3);
        assert_eq!(routes.name(2), "jobs");
    }
}
