-- The last lines each instance printed, kept by its node's agent for the API and
-- `berth status`. A table of its own, without an outbox trigger: log lines change often
-- and are not state anyone reconciles on, so they must not become events.
create table instance_logs (
    instance_id bigint primary key references instances (id),
    lines text not null default '',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create trigger instance_logs_touch before update on instance_logs for each row execute function berth_touch_updated_at();
