-- A message for an idle session is queued in one statement (issue 10).
--
-- gateway.lock_idle_session takes the locks RunStore.insert takes (the
-- idempotency key's, when there is one, then the session's; both
-- transaction-scoped) and then answers with a fresh snapshot: a function
-- declared VOLATILE takes a new snapshot for each of its statements under
-- READ COMMITTED, so runs committed while it waited for a lock are seen
-- (https://www.postgresql.org/docs/15/xfunc-volatility.html). It returns
-- NULL when the key was already used in the org or the session has an
-- active run (the caller then takes the general path, which decides and
-- raises); otherwise the transcript turn of the session's last completed
-- run (0 when none, or when that run committed elsewhere). The lock is held
-- until the calling statement's transaction ends, so the run it inserts is
-- in place before another insert of the session looks.
CREATE FUNCTION gateway.lock_idle_session(
    p_session_id uuid, p_org_id text, p_idempotency_key text, p_idempotency_lock text
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last_turn integer;
BEGIN
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_idempotency_lock, 0));
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_session_id::text, 0));
    IF p_idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM gateway.runs WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key
    ) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (
        SELECT 1 FROM gateway.runs
        WHERE session_id = p_session_id AND status IN ('queued', 'running', 'requires_action')
    ) THEN
        RETURN NULL;
    END IF;
    SELECT c.transcript_turn INTO last_turn FROM gateway.runs c
    WHERE c.session_id = p_session_id AND c.status = 'completed'
    ORDER BY c.created_at DESC LIMIT 1;
    RETURN coalesce(last_turn, 0);
END
$$;
