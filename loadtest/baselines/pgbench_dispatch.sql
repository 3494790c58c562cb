\set lead random(1, 1000000000000)
SELECT dispatch(:lead, :shards, 10, 4);
