-- Where specs come from, and what went wrong reading them.

-- The watcher owns spec_error (the located message of an invalid spec, or of a spec that
-- another source already defines); the app keeps running its last good spec meanwhile.
-- source_file is the spec file inside the source, so a file that fails to parse keeps its
-- apps instead of deleting them.
alter table apps add column spec_error text;
alter table apps add column source_file text;
create index apps_source on apps (source) where deleted_at is null;

-- One row per source (a folder or a Git repository/branch/path): its last applied
-- revision and its last error. No events: sources are status, not desired state.
create table sources (
    id bigint generated always as identity primary key,
    -- folder:/abs/path or git:url#branch:path
    name text not null unique,
    revision text,
    error text,
    app_count integer not null default 0,
    applied_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create trigger sources_touch before update on sources for each row execute function berth_touch_updated_at();
