-- Every batch updates the ledger rows of the subjects it touches, in place. A row's update
-- changes no indexed column, so Postgres can keep it on the same page without a new index
-- entry (a HOT update) when the page has room. With full pages (the default fillfactor of
-- 100) almost no update finds room: measured on 40 000-row upserts, 182 HOT updates of
-- 240 000, against 154 679 with fillfactor 70, which took about 25% less time per batch.
-- Pages written from now on keep 30% free; existing pages follow as they are rewritten
-- (or at once with `VACUUM FULL ledgers`, which locks the table while it runs).
ALTER TABLE ledgers SET (fillfactor = 70);
