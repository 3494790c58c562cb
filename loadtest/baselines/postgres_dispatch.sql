-- The rotation-and-budget decision of one auto-buy lead (R1, R21, R22's budget check)
-- as a PostgreSQL function: the baseline rota is compared with in BENCHMARKS.md.
-- Loaded by postgres.sh with psql variables :shards, :pros, :budget.
CREATE TABLE pros (
    shard  int    NOT NULL,
    pro    int    NOT NULL,
    pass   bigint NOT NULL,  -- the rotation: lowest pass next
    stride bigint NOT NULL,  -- STRIDE_SCALE / weight
    budget bigint NOT NULL,  -- available auto-buy budget (credits)
    PRIMARY KEY (shard, pro)
);
CREATE INDEX pros_rotation ON pros (shard, pass, pro);
CREATE TABLE leads (id bigint PRIMARY KEY, shard int NOT NULL, pros int[] NOT NULL);
-- The dispatched offers (what a subscriber would read).
CREATE TABLE offers (seq bigserial PRIMARY KEY, lead bigint NOT NULL, shard int NOT NULL,
                     pro int NOT NULL, price int NOT NULL);

INSERT INTO pros
SELECT s, p, p, 1000, :budget FROM generate_series(0, :shards - 1) s, generate_series(1, :pros) p;
ANALYZE pros;

-- One lead: idempotent on its id; the shard's rotation is serialised by a
-- transaction-scoped advisory lock (the shard actor of rota).
CREATE FUNCTION dispatch(p_lead bigint, p_shards int, p_price int, p_group int) RETURNS int[]
LANGUAGE plpgsql AS $$
DECLARE
    v_shard int := p_lead % p_shards;
    v_pros  int[];
BEGIN
    SELECT pros INTO v_pros FROM leads WHERE id = p_lead;
    IF FOUND THEN
        RETURN v_pros;
    END IF;
    PERFORM pg_advisory_xact_lock(v_shard);
    SELECT coalesce(array_agg(pro ORDER BY pass, pro), '{}') INTO v_pros FROM (
        SELECT pro, pass FROM pros
        WHERE shard = v_shard AND budget >= p_price
        ORDER BY pass, pro LIMIT p_group) taken;
    UPDATE pros SET budget = budget - p_price, pass = pass + stride
    WHERE shard = v_shard AND pro = ANY (v_pros);
    INSERT INTO leads VALUES (p_lead, v_shard, v_pros);
    INSERT INTO offers (lead, shard, pro, price) SELECT p_lead, v_shard, unnest(v_pros), p_price;
    RETURN v_pros;
END $$;
