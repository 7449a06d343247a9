-- The data model of DESIGN §2. Every table has created_at and updated_at; every foreign
-- key is indexed; every "at most one" rule is a unique constraint or index.
-- Ids are bigint identities: they are ordered, cheap to index and readable in a CLI.

-- updated_at follows real changes only: an update that changes nothing keeps it, so the
-- outbox trigger below (which skips unchanged rows) stays quiet too.
create function berth_touch_updated_at() returns trigger language plpgsql as $$
begin
    if row(new.*) is distinct from row(old.*) then
        new.updated_at := now();
    end if;
    return new;
end $$;

create table nodes (
    id bigint generated always as identity primary key,
    name text not null unique,
    -- where the edge reaches this node's instances
    address text not null,
    labels jsonb not null default '{}',
    -- {"cpus": 2.0, "memory": 25769803776}
    capacity jsonb not null default '{}',
    state text not null default 'ready' check (state in ('ready', 'draining', 'down')),
    last_heartbeat_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table apps (
    id bigint generated always as identity primary key,
    name text not null unique check (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    -- the last valid spec (canonical JSON); null while the app has never had a valid one
    spec jsonb,
    spec_hash text,
    -- bumps when the spec changes; observed_generation catches up once it is rolled out
    generation bigint not null default 0,
    observed_generation bigint not null default 0,
    -- the file path or repository the app comes from; one app belongs to one source
    source text not null,
    source_revision text,
    current_deployment_id bigint,
    -- {"ready": bool, "reason": "Progressing", "message": "..."} (DESIGN §6)
    status jsonb not null default '{"ready": false, "reason": "Pending", "message": ""}',
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table images (
    id bigint generated always as identity primary key,
    app_id bigint not null references apps (id),
    reference text not null,
    digest text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index images_app_id on images (app_id);

create table deployments (
    id bigint generated always as identity primary key,
    app_id bigint not null references apps (id),
    generation bigint not null,
    -- the spec snapshot this deployment rolls out
    spec jsonb not null,
    spec_hash text not null,
    source_revision text,
    status text not null default 'pending' check (status in
        ('pending', 'building', 'deploying', 'active', 'superseded', 'failed', 'cancelled')),
    image_id bigint references images (id),
    error text,
    -- [{"at": "...", "step": "building", "message": "..."}], appended by each transition
    timeline jsonb not null default '[]',
    building_at timestamptz,
    deploying_at timestamptz,
    active_at timestamptz,
    superseded_at timestamptz,
    failed_at timestamptz,
    cancelled_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index deployments_app_id on deployments (app_id);
create index deployments_image_id on deployments (image_id);
-- at most one deployment of an app is on its way (not yet turned into instances)
create unique index deployments_one_in_flight on deployments (app_id)
    where status in ('pending', 'building', 'deploying');
create index deployments_open on deployments (status)
    where status in ('pending', 'building', 'deploying', 'active');

alter table apps add constraint apps_current_deployment_fk
    foreign key (current_deployment_id) references deployments (id);
create index apps_current_deployment_id on apps (current_deployment_id);

create table image_builds (
    id bigint generated always as identity primary key,
    -- one build per deployment, ever
    deployment_id bigint not null unique references deployments (id),
    status text not null default 'pending' check (status in
        ('pending', 'running', 'completed', 'failed', 'cancelled')),
    claimed_by text,
    lease_expires_at timestamptz,
    attempts integer not null default 0,
    log text not null default '',
    error text,
    started_at timestamptz,
    finished_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index image_builds_claimable on image_builds (created_at)
    where status in ('pending', 'running');

create table instances (
    id bigint generated always as identity primary key,
    app_id bigint not null references apps (id),
    -- the deployment that created it (also in deployment_instances, the contract's join)
    deployment_id bigint references deployments (id),
    node_id bigint references nodes (id),
    image_id bigint references images (id),
    desired_state text not null default 'running' check (desired_state in ('running', 'stopped')),
    state text not null default 'pending' check (state in
        ('pending', 'starting', 'running', 'unhealthy', 'stopping', 'stopped', 'failed', 'lost')),
    host text,
    port integer check (port between 1 and 65535),
    runtime_id text,
    restart_count integer not null default 0,
    last_error text,
    exit_code integer,
    started_at timestamptz,
    stopped_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index instances_app_id on instances (app_id);
create index instances_deployment_id on instances (deployment_id);
create index instances_node_id on instances (node_id);
create index instances_image_id on instances (image_id);
create index instances_live on instances (node_id, app_id)
    where desired_state = 'running' or state not in ('stopped', 'failed', 'lost');

create table deployment_instances (
    deployment_id bigint not null references deployments (id),
    instance_id bigint not null references instances (id),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (deployment_id, instance_id)
);
create index deployment_instances_instance_id on deployment_instances (instance_id);

create table domains (
    id bigint generated always as identity primary key,
    app_id bigint not null references apps (id),
    hostname text not null unique
        check (hostname = lower(hostname) and hostname !~ '[:/ ]' and hostname !~ '\.$'),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index domains_app_id on domains (app_id);

create trigger nodes_touch before update on nodes for each row execute function berth_touch_updated_at();
create trigger apps_touch before update on apps for each row execute function berth_touch_updated_at();
create trigger images_touch before update on images for each row execute function berth_touch_updated_at();
create trigger deployments_touch before update on deployments for each row execute function berth_touch_updated_at();
create trigger image_builds_touch before update on image_builds for each row execute function berth_touch_updated_at();
create trigger instances_touch before update on instances for each row execute function berth_touch_updated_at();
create trigger deployment_instances_touch before update on deployment_instances for each row execute function berth_touch_updated_at();
create trigger domains_touch before update on domains for each row execute function berth_touch_updated_at();
