//! Setup shared by the integration tests, which include it with
//! `mod support;`.

use deferred_semaphore_redis::scripts::Namespace;
use test_redis::RedisServer;

/// Writes `limits` (field, value pairs) into the limits hash of
/// `namespace`, and creates its meta hash at epoch `e0` with no grace, so
/// that the first acquire is granted at once.
pub fn prepare_namespace(server: &RedisServer, namespace: &Namespace, limits: &[(&str, &str)]) {
    let limits_key = namespace.limits_key();
    let mut command = vec!["HSET", limits_key.as_str()];
    for (field, value) in limits {
        command.push(field);
        command.push(value);
    }
    server.command(&command);
    server.command(&[
        "HSET",
        &namespace.meta_key(),
        "epoch",
        "e0",
        "grace_until",
        "0",
        "fence",
        "0",
    ]);
}

/// Returns the `ZCARD` reply for the holder set of `key` (the global set
/// for `None`) in RESP text without the line end, such as `:0`.
pub fn holder_count(server: &RedisServer, namespace: &Namespace, key: Option<&str>) -> String {
    server
        .command(&["ZCARD", &namespace.holders_key(key)])
        .trim()
        .to_owned()
}
