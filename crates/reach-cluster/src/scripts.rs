//! The Lua scripts run in Redis. Each touches one key (a user's holder hash) and publishes on
//! that user's channel in the same step, so state and messages never disagree.

use std::sync::OnceLock;

use redis::Script;

/// What a hold or release script answered: the version of the change it made (0: none) and
/// the number of holders after it (-1: nothing was released).
pub fn decode_count(value: &redis::Value) -> Option<(u64, i64)> {
    match redis::from_redis_value_ref::<(i64, i64)>(value) {
        Ok((version, holders)) => Some((u64::try_from(version).ok()?, holders)),
        Err(_) => None,
    }
}

/// A user's holder set as the scripts publish and return it: MessagePack
/// `[version, ["<node id>@<incarnation>", ...]]`. The incarnation tells a node's current life
/// from the hold its previous life left (see [`holder`]); an entry without `@` (written by an
/// older build) names the node only.
pub fn decode_state(bytes: &[u8]) -> Result<(u64, Vec<String>), rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// One entry of a holder set: the node id and, when the entry carries it, the incarnation.
pub fn holder(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once('@') {
        Some((node, incarnation)) => (node, Some(incarnation)),
        None => (entry, None),
    }
}

/// Bumps the version, publishes `[version, ["node@incarnation", ...]]` and returns the version.
/// KEYS[1] = holder hash; `channel` = the user's presence channel.
const PUBLISH_STATE: &str = r#"
local function publish_state(key, channel)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local v = tonumber(redis.call('HGET', key, '~v') or '0')
  if v < now + 1 then v = now + 1 else v = v + 1 end
  redis.call('HSET', key, '~v', string.format('%.0f', v))
  local nodes = {}
  local h = redis.call('HGETALL', key)
  for i = 1, #h, 2 do
    if h[i] ~= '~v' then nodes[#nodes + 1] = h[i] .. '@' .. h[i + 1] end
  end
  redis.call('PUBLISH', channel, cmsgpack.pack({v, nodes}))
  return v
end
"#;

/// Hold: ARGV = node, incarnation, channel. Returns `[version, holders]`: the new version
/// and how many nodes hold the user now, or `[0, holders]` if the node already held it (its
/// incarnation is updated; nothing is published). `[v, 1]` is the user's first hold anywhere.
const HOLD: &str = r#"
local prev = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PERSIST', KEYS[1])
if prev then return {0, redis.call('HLEN', KEYS[1]) - 1} end
local v = publish_state(KEYS[1], ARGV[3])
return {v, redis.call('HLEN', KEYS[1]) - 1}
"#;

/// Release: ARGV = node, incarnation ('' = any), channel, ttl of an empty hash in ms.
/// Returns `[version, holders left]`, or `[0, -1]` if there was nothing to release.
/// `[v, 0]` is the user's last hold anywhere ending.
const RELEASE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return {0, -1} end
if ARGV[2] ~= '' and cur ~= ARGV[2] then return {0, -1} end
redis.call('HDEL', KEYS[1], ARGV[1])
local v = publish_state(KEYS[1], ARGV[3])
local left = redis.call('HLEN', KEYS[1]) - 1
if left == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {v, left}
"#;

/// Peek: returns MessagePack `[version, ["node@incarnation", ...]]`. A missing hash reads as
/// no holder at the current Redis time, which every later change's version exceeds.
const PEEK: &str = r#"
local h = redis.call('HGETALL', KEYS[1])
local v = nil
local nodes = {}
for i = 1, #h, 2 do
  if h[i] == '~v' then v = tonumber(h[i + 1]) else nodes[#nodes + 1] = h[i] .. '@' .. h[i + 1] end
end
if not v then
  local t = redis.call('TIME')
  v = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
return cmsgpack.pack({v, nodes})
"#;

/// A script: its source (for `SCRIPT LOAD`) and the redis-rs handle (its SHA1 for `EVALSHA`,
/// and `invoke_async`, which loads it when Redis does not know it).
pub struct Lua {
    pub source: String,
    pub script: Script,
}

impl Lua {
    fn new(parts: &[&str]) -> Lua {
        let source = parts.concat();
        let script = Script::new(&source);
        Lua { source, script }
    }

    pub fn sha(&self) -> &str {
        self.script.get_hash()
    }
}

pub fn hold() -> &'static Lua {
    static S: OnceLock<Lua> = OnceLock::new();
    S.get_or_init(|| Lua::new(&[PUBLISH_STATE, HOLD]))
}

pub fn release() -> &'static Lua {
    static S: OnceLock<Lua> = OnceLock::new();
    S.get_or_init(|| Lua::new(&[PUBLISH_STATE, RELEASE]))
}

pub fn peek() -> &'static Lua {
    static S: OnceLock<Lua> = OnceLock::new();
    S.get_or_init(|| Lua::new(&[PEEK]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_entries() {
        assert_eq!(holder("node-1@00ff"), ("node-1", Some("00ff")));
        assert_eq!(holder("node-1"), ("node-1", None));
        let state = rmp_serde::to_vec(&(7u64, vec!["a@1", "b@2"])).unwrap();
        let (version, nodes) = decode_state(&state).unwrap();
        assert_eq!(version, 7);
        assert_eq!(holder(&nodes[1]), ("b", Some("2")));
    }
}
