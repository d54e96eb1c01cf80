//! What operators do: the audit trail of control-plane actions, and the switches that survive a
//! restart (`paused`).

use super::*;

/// One control-plane action as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: u64,
    /// When (Unix ms).
    pub at_ms: i64,
    /// Who: the credential's name and the peer address.
    pub actor: String,
    /// What: `pause`, `resume`, `start_round`, `export`, `rollback`, `reload`, `drain`.
    pub action: String,
    /// Its parameters (JSON).
    pub detail: String,
    /// `ok` or `refused: …`.
    pub outcome: String,
}

impl Store {
    /// Appends an audit row (durable on return); returns its id.
    pub fn record_audit(
        &mut self,
        at_ms: i64,
        actor: &str,
        action: &str,
        detail: &str,
        outcome: &str,
    ) -> Result<u64, StoreError> {
        self.conn.execute(
            "INSERT INTO audit (at_ms, actor, action, detail, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at_ms, actor, action, detail, outcome],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// The newest `limit` audit rows, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, at_ms, actor, action, detail, outcome
             FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(AuditRecord {
                id: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                detail: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets an operator switch (durable on return).
    pub fn set_service_state(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO service_state (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// An operator switch, if set.
    pub fn service_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM service_state WHERE key = ?1", params![key], |r| r.get(0))
            .optional()?)
    }
}
