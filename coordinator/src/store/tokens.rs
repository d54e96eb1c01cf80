//! The client registry, enrollment tokens and revocations; the privacy ledger.

use super::*;

impl Store {
    /// Records an issued token (and enrolls its client if new). Returns the token id to embed.
    pub fn record_token(
        &mut self,
        client: ClientId,
        expires_unix_s: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let c = to_i64(client.0)?;
        tx.execute(
            "INSERT OR IGNORE INTO clients (client_id, enrolled_ms) VALUES (?1, ?2)",
            params![c, now_ms],
        )?;
        tx.execute(
            "INSERT INTO tokens (client_id, expires_s, issued_ms) VALUES (?1, ?2, ?3)",
            params![c, to_i64(expires_unix_s)?, now_ms],
        )?;
        let id = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(id)
    }

    /// Revokes one token.
    pub fn revoke_token(&mut self, token_id: u64, now_ms: i64) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE token_id = ?1",
            params![to_i64(token_id)?, now_ms],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownToken(token_id));
        }
        Ok(())
    }

    /// Revokes a client: every token it holds, now and later, is refused.
    pub fn revoke_client(&mut self, client: ClientId, now_ms: i64) -> Result<(), StoreError> {
        let c = to_i64(client.0)?;
        self.conn.execute(
            "INSERT INTO clients (client_id, enrolled_ms, revoked_ms) VALUES (?1, ?2, ?2)
             ON CONFLICT (client_id) DO UPDATE SET revoked_ms = coalesce(revoked_ms, ?2)",
            params![c, now_ms],
        )?;
        Ok(())
    }

    /// Revoked token ids and revoked client ids.
    pub fn revocations(&self) -> Result<(Vec<u64>, Vec<u64>), StoreError> {
        let ids = |sql: &str| -> Result<Vec<u64>, StoreError> {
            let mut stmt = self.conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            Ok(rows.map(|r| r.map(|v| v as u64)).collect::<Result<_, _>>()?)
        };
        Ok((
            ids("SELECT token_id FROM tokens WHERE revoked_ms IS NOT NULL")?,
            ids("SELECT client_id FROM clients WHERE revoked_ms IS NOT NULL")?,
        ))
    }

    /// N, the enrolled population: clients not revoked that hold at least one token neither
    /// revoked nor expired at `now_unix_s`. Central DP derives its sampling rate from it.
    pub fn enrolled_population(&self, now_unix_s: u64) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM clients c WHERE c.revoked_ms IS NULL AND EXISTS (
                 SELECT 1 FROM tokens t
                 WHERE t.client_id = c.client_id AND t.revoked_ms IS NULL AND t.expires_s > ?1)",
            params![to_i64(now_unix_s)?],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Every issued token, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT token_id, client_id, expires_s, issued_ms, revoked_ms FROM tokens ORDER BY token_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRecord {
                token_id: r.get::<_, i64>(0)? as u64,
                client: ClientId(r.get::<_, i64>(1)? as u64),
                expires_unix_s: r.get::<_, i64>(2)? as u64,
                issued_ms: r.get(3)?,
                revoked_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends a ledger entry and returns once it is durable (committed and fsynced).
    pub fn append_ledger(&mut self, entry: &LedgerEntry, recorded_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        insert_ledger(&tx, entry, recorded_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Every ledger entry, oldest round first, validated.
    pub fn ledger_entries(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT round, q, sigma, steps FROM privacy_ledger ORDER BY round")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?, r.get::<_, i64>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (round, q, sigma, steps) = row?;
            let round = round as u64;
            let bad = |detail: String| StoreError::BadRow { round, detail };
            let q = SamplingRate::new(q).map_err(|e| bad(e.to_string()))?;
            let sigma = NoiseMultiplier::new(sigma).map_err(|e| bad(e.to_string()))?;
            let steps = u64::try_from(steps).map_err(|_| bad(format!("negative step count {steps}")))?;
            out.push(LedgerEntry { round, mechanism: Mechanism { q, sigma, steps } });
        }
        Ok(out)
    }
}
