//! The command table: whether a command reads or writes, where its keys are,
//! and whether it needs a connection of its own.
//!
//! The table is loaded from the upstream's `COMMAND` reply at start-up;
//! `builtin.rs` covers the common commands when that fails.

use std::collections::{HashMap, HashSet};

use super::builtin::BUILTIN_COMMANDS;
use super::frame::{Request, Value};

/// Routing facts about a command: arity, key positions, read-only flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// Arity as Redis reports it: negative means "at least".
    pub arity: i32,
    /// Position of the first key, 0 for none.
    pub first_key: i32,
    /// Position of the last key; negative counts from the end.
    pub last_key: i32,
    pub key_step: i32,
    pub readonly: bool,
}

/// Commands that run on a connection of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Multiplexed on a shared pipelined connection.
    None,
    /// Blocks the upstream connection until data arrives or a timeout.
    Blocking,
    /// Starts or changes a subscription.
    Subscribe,
    /// MULTI or WATCH: the rest of the transaction stays on one connection.
    Transaction,
}

/// Command name to spec, from the upstream or the built-in list.
#[derive(Debug, Clone)]
pub struct CommandTable {
    /// Looked up for every request. The names come from skiff's list or
    /// the upstream's `COMMAND` reply, never from clients, so a fast hash
    /// without SipHash's flooding resistance fits.
    specs: HashMap<String, Entry, foldhash::fast::RandomState>,
    /// Commands with sub-commands (`XINFO`, `OBJECT`).
    containers: HashSet<String, foldhash::fast::RandomState>,
}

/// A command's spec, and whether its sub-commands have specs of their own,
/// so only their requests pay for a second lookup.
#[derive(Debug, Clone, Copy)]
struct Entry {
    spec: CommandSpec,
    has_subcommands: bool,
}

impl CommandTable {
    /// Builds the table of common commands that skiff ships with.
    pub fn builtin() -> CommandTable {
        let specs: Vec<(String, CommandSpec)> = BUILTIN_COMMANDS
            .iter()
            .map(|&(name, arity, readonly, first_key, last_key, key_step)| {
                let spec = CommandSpec {
                    arity,
                    first_key,
                    last_key,
                    key_step,
                    readonly,
                };
                (name.to_string(), spec)
            })
            .collect();
        let mut table = CommandTable {
            specs: HashMap::default(),
            containers: HashSet::default(),
        };
        for (name, spec) in specs {
            table.insert(name, spec);
        }
        table
    }

    /// Merges the entries of a `COMMAND` reply over the built-in table.
    ///
    /// Returns the number of entries read from the reply.
    pub fn merge_command_reply(&mut self, reply: Value) -> usize {
        let mut merged = 0;
        for entry in reply.into_items().unwrap_or_default() {
            for (name, spec) in parse_command_entry(entry).unwrap_or_default() {
                self.insert(name, spec);
                merged += 1;
            }
        }
        merged
    }

    fn insert(&mut self, name: String, spec: CommandSpec) {
        if let Some((container, _)) = name.split_once('|') {
            self.containers.insert(container.to_string());
            if let Some(entry) = self.specs.get_mut(container) {
                entry.has_subcommands = true;
            }
        }
        let has_subcommands = self.containers.contains(&name);
        self.specs.insert(
            name,
            Entry {
                spec,
                has_subcommands,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Returns the spec of `request`, preferring its sub-command's own spec
    /// (`XINFO STREAM key` has its key where `XINFO` alone has none).
    pub fn get(&self, name: &str, request: &Request) -> Option<&CommandSpec> {
        let entry = self.specs.get(name);
        if entry.is_some_and(|entry| entry.has_subcommands)
            || entry.is_none() && self.containers.contains(name)
        {
            let sub = request.arg_upper(1).unwrap_or_default();
            if let Some(entry) = self.specs.get(&format!("{name}|{sub}")) {
                return Some(&entry.spec);
            }
        }
        entry.map(|entry| &entry.spec)
    }

    /// Returns true when `request` only reads, so a replica may serve it.
    pub fn is_readonly(&self, name: &str, request: &Request) -> bool {
        self.get(name, request).is_some_and(|spec| spec.readonly)
    }

    /// Returns the argument positions of the keys in `request`.
    pub fn key_positions(&self, name: &str, request: &Request) -> Vec<usize> {
        key_positions(self.get(name, request), name, request).collect()
    }
}

/// Returns the argument positions of the keys in `request`, whose spec is
/// `spec`. Keys whose positions depend on other arguments are found from
/// those arguments.
pub fn key_positions(spec: Option<&CommandSpec>, name: &str, request: &Request) -> KeyPositions {
    let args = &request.args;
    if let Some(mut positions) = movable_key_positions(name, request) {
        positions.retain(|&i| i < args.len());
        return KeyPositions::Listed(positions.into_iter());
    }
    let Some(spec) = spec.filter(|spec| spec.first_key > 0 && spec.key_step > 0) else {
        return KeyPositions::Listed(Vec::new().into_iter());
    };
    let count = args.len() as i32;
    let last = if spec.last_key < 0 {
        count + spec.last_key
    } else {
        spec.last_key.min(count - 1)
    };
    KeyPositions::Stepped((spec.first_key..=last).step_by(spec.key_step as usize))
}

/// The key positions of one request, without a list for the usual case of
/// keys at fixed steps.
pub enum KeyPositions {
    Stepped(std::iter::StepBy<std::ops::RangeInclusive<i32>>),
    Listed(std::vec::IntoIter<usize>),
}

impl Iterator for KeyPositions {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            KeyPositions::Stepped(range) => range.next().map(|i| i as usize),
            KeyPositions::Listed(list) => list.next(),
        }
    }
}

/// Returns how `request` must be pinned to an upstream connection.
///
/// NOTE: WAIT runs on a dedicated connection that has written nothing, so it
/// returns at once with the number of replicas instead of waiting for the
/// client's own writes, which went over a shared connection.
pub fn pinning(name: &str, request: &Request) -> Pinning {
    match name {
        "BLPOP" | "BRPOP" | "BLMOVE" | "BRPOPLPUSH" | "BZPOPMIN" | "BZPOPMAX" | "BLMPOP"
        | "BZMPOP" | "WAIT" | "WAITAOF" => Pinning::Blocking,
        "XREAD" | "XREADGROUP" if has_token(request, "BLOCK") => Pinning::Blocking,
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" => Pinning::Subscribe,
        "MULTI" | "WATCH" => Pinning::Transaction,
        _ => Pinning::None,
    }
}

fn has_token(request: &Request, token: &str) -> bool {
    request
        .args
        .iter()
        .skip(1)
        .any(|arg| arg.eq_ignore_ascii_case(token.as_bytes()))
}

/// Key positions of commands whose keys follow a count or a token.
fn movable_key_positions(name: &str, request: &Request) -> Option<Vec<usize>> {
    let args = &request.args;
    let counted = |count_at: usize| -> Vec<usize> {
        let count = args
            .get(count_at)
            .and_then(|arg| std::str::from_utf8(arg).ok())
            .and_then(|text| text.parse::<usize>().ok())
            .unwrap_or(0);
        (count_at + 1..count_at + 1 + count.min(args.len())).collect()
    };
    let positions = match name {
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => counted(2),
        "ZUNION" | "ZINTER" | "ZDIFF" | "ZINTERCARD" | "SINTERCARD" | "LMPOP" | "ZMPOP" => {
            counted(1)
        }
        "BLMPOP" | "BZMPOP" => counted(2),
        "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => {
            let mut positions = vec![1];
            positions.extend(counted(2));
            positions
        }
        "XREAD" | "XREADGROUP" => {
            let streams = args
                .iter()
                .position(|arg| arg.eq_ignore_ascii_case(b"STREAMS"))?;
            let rest = args.len() - streams - 1;
            (streams + 1..streams + 1 + rest / 2).collect()
        }
        "SORT" | "SORT_RO" => vec![1],
        _ => return None,
    };
    Some(positions)
}

/// Reads one entry of a `COMMAND` reply: name, arity, flags, first key,
/// last key, step, then fields this table does not use, and in Redis 7 the
/// sub-commands (tenth field) in the same shape, named `container|sub`.
fn parse_command_entry(entry: Value) -> Option<Vec<(String, CommandSpec)>> {
    let fields = entry.into_items()?;
    let name = String::from_utf8_lossy(fields.first()?.as_bytes()?).to_ascii_uppercase();
    let flags = fields.get(2)?.clone().into_items()?;
    let readonly = flags.iter().any(|flag| {
        flag.as_bytes()
            .is_some_and(|f| f.eq_ignore_ascii_case(b"readonly"))
    });
    let spec = CommandSpec {
        arity: fields.get(1)?.as_int()? as i32,
        first_key: fields.get(3)?.as_int()? as i32,
        last_key: fields.get(4)?.as_int()? as i32,
        key_step: fields.get(5)?.as_int()? as i32,
        readonly,
    };
    let mut entries = vec![(name, spec)];
    let subcommands = fields.get(9).cloned().and_then(Value::into_items);
    for sub in subcommands.unwrap_or_default() {
        entries.extend(parse_command_entry(sub).unwrap_or_default());
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(args: &[&str]) -> Request {
        let args = args
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        Request::from_args(args)
    }

    fn keys(args: &[&str]) -> Vec<usize> {
        let request = request(args);
        CommandTable::builtin().key_positions(&request.name(), &request)
    }

    #[test]
    fn fixed_key_positions() {
        assert_eq!(keys(&["GET", "a"]), vec![1]);
        assert_eq!(keys(&["MSET", "a", "1", "b", "2"]), vec![1, 3]);
        assert_eq!(keys(&["DEL", "a", "b", "c"]), vec![1, 2, 3]);
        assert_eq!(keys(&["BRPOP", "q1", "q2", "0"]), vec![1, 2]);
        assert_eq!(keys(&["PING"]), Vec::<usize>::new());
    }

    #[test]
    fn movable_key_positions_follow_counts() {
        assert_eq!(
            keys(&["EVALSHA", "abc", "2", "k1", "k2", "arg"]),
            vec![3, 4]
        );
        assert_eq!(keys(&["EVAL", "s", "0", "arg"]), Vec::<usize>::new());
        assert_eq!(keys(&["ZUNIONSTORE", "d", "2", "a", "b"]), vec![1, 3, 4]);
        assert_eq!(
            keys(&["XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "s1", "s2", "$", "$"]),
            vec![6, 7]
        );
    }

    #[test]
    fn subcommand_spec_gives_key_position() {
        assert_eq!(keys(&["XINFO", "STREAM", "s"]), vec![2]);
        assert_eq!(keys(&["OBJECT", "ENCODING", "k"]), vec![2]);
        assert_eq!(keys(&["XINFO", "HELP"]), Vec::<usize>::new());
    }

    #[test]
    fn subcommand_spec_in_either_order() {
        let spec = |first_key, readonly| CommandSpec {
            arity: -2,
            first_key,
            last_key: first_key,
            key_step: 1,
            readonly,
        };
        let stream = request(&["XINFO", "STREAM", "s"]);
        let help = request(&["XINFO", "HELP"]);
        for container_first in [true, false] {
            let mut table = CommandTable {
                specs: HashMap::default(),
                containers: HashSet::default(),
            };
            let entries = [
                ("XINFO".to_string(), spec(0, false)),
                ("XINFO|STREAM".to_string(), spec(2, true)),
            ];
            let order = if container_first { [0, 1] } else { [1, 0] };
            for i in order {
                table.insert(entries[i].0.clone(), entries[i].1);
            }
            assert_eq!(table.key_positions("XINFO", &stream), vec![2]);
            assert!(table.is_readonly("XINFO", &stream));
            assert_eq!(table.key_positions("XINFO", &help), Vec::<usize>::new());
            assert!(!table.is_readonly("XINFO", &help));
        }
    }

    #[test]
    fn pinning_detects_blocking_xread() {
        assert_eq!(
            pinning("XREAD", &request(&["XREAD", "STREAMS", "s", "0"])),
            Pinning::None
        );
        let blocking = request(&["XREAD", "block", "100", "STREAMS", "s", "0"]);
        assert_eq!(pinning("XREAD", &blocking), Pinning::Blocking);
        assert_eq!(
            pinning("BRPOP", &request(&["BRPOP", "q", "0"])),
            Pinning::Blocking
        );
    }

    #[test]
    fn command_reply_entry_is_parsed() {
        let entry = Value::Array(vec![
            Value::Str(Bytes::from_static(b"get")),
            Value::Int(2),
            Value::Array(vec![Value::Str(Bytes::from_static(b"readonly"))]),
            Value::Int(1),
            Value::Int(1),
            Value::Int(1),
        ]);
        let entries = parse_command_entry(entry).unwrap();
        let (name, spec) = entries[0].clone();
        assert_eq!(name, "GET");
        assert!(spec.readonly);
        assert_eq!((spec.first_key, spec.last_key, spec.key_step), (1, 1, 1));
    }
}
