-- Consumer membership coordinated through Postgres. Each instance of a consumer group
-- heartbeats here; the live members (heartbeat within the lease) split the topic's
-- partitions deterministically. Ownership handovers are made safe by the epochs in
-- consumer_offsets, not by this table: a member that still consumes a partition it lost is
-- fenced at its next commit.
CREATE TABLE consumer_members (
    group_id     text        NOT NULL,
    topic        text        NOT NULL,
    member_id    text        NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, member_id)
);
