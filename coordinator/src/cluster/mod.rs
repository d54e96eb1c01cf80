//! Several coordinator nodes on one PostgreSQL database: groundwork. Today only the leader lease
//! is here ([`lease`]); `starling serve` still runs one node on SQLite (docs/operations.md says
//! so). The lease is the piece every other part of scale-out depends on: exactly one node may
//! commit a population's rounds at a time, a node that lost its lease stops committing before
//! another can take it, and a commit made with a stale lease is refused by the database itself.

pub mod lease;
pub mod node;
