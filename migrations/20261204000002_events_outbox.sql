-- The transactional outbox of DESIGN §3. A row trigger on every table writes one events row
-- per insert, update and delete in the same transaction as the change, and wakes the
-- listener with pg_notify. Postgres folds identical notifications of one transaction into
-- one, so a transaction touching a thousand rows wakes the listener once.
--
-- The listener reads rows with published_at is null in id order (never a high-water mark:
-- ids are assigned before commit, so they commit out of order), publishes them with
-- Nats-Msg-Id = id and then sets published_at. Published rows stay as history until the
-- retention period passes.

create table events (
    id bigint generated always as identity primary key,
    -- the subject prefix: app, deployment, image_build, instance, deployment_instance, domain, node
    table_name text not null,
    op text not null check (op in ('created', 'updated', 'deleted')),
    row_id bigint not null,
    app_id bigint,
    deployment_id bigint,
    node_id bigint,
    -- clock time of the change inside its transaction, not the transaction's start
    created_at timestamptz not null default clock_timestamp(),
    published_at timestamptz
);
create index events_unpublished on events (id) where published_at is null;
create index events_published_at on events (published_at) where published_at is not null;

create function berth_emit(
    p_table text, p_op text, p_row bigint, p_app bigint, p_deployment bigint, p_node bigint
) returns void language plpgsql as $$
begin
    insert into events (table_name, op, row_id, app_id, deployment_id, node_id)
    values (p_table, p_op, p_row, p_app, p_deployment, p_node);
    perform pg_notify('berth_events', '');
end $$;


-- One small function per table: reading fields directly is much cheaper than to_jsonb(row).
create function berth_event_apps() returns trigger language plpgsql as $$
declare r apps;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    perform berth_emit('app', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, r.id, r.current_deployment_id, null);
    return null;
end $$;

create function berth_event_deployments() returns trigger language plpgsql as $$
declare r deployments;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    perform berth_emit('deployment', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, r.app_id, r.id, null);
    return null;
end $$;

create function berth_event_image_builds() returns trigger language plpgsql as $$
declare r image_builds; v_app bigint;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    select app_id into v_app from deployments where id = r.deployment_id;
    perform berth_emit('image_build', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, v_app, r.deployment_id, null);
    return null;
end $$;

create function berth_event_instances() returns trigger language plpgsql as $$
declare r instances;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    perform berth_emit('instance', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, r.app_id, r.deployment_id, r.node_id);
    -- an instance moved off a node must also wake the node it left
    if tg_op = 'UPDATE' and old.node_id is distinct from new.node_id and old.node_id is not null then
        perform berth_emit('instance', 'updated', r.id, r.app_id, r.deployment_id, old.node_id);
    end if;
    return null;
end $$;

create function berth_event_deployment_instances() returns trigger language plpgsql as $$
declare r deployment_instances; v_app bigint; v_node bigint;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    select app_id, node_id into v_app, v_node from instances where id = r.instance_id;
    perform berth_emit('deployment_instance', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.instance_id, v_app, r.deployment_id, v_node);
    return null;
end $$;

create function berth_event_domains() returns trigger language plpgsql as $$
declare r domains;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    perform berth_emit('domain', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, r.app_id, null, null);
    return null;
end $$;

create function berth_event_nodes() returns trigger language plpgsql as $$
declare r nodes;
begin
    r := case when tg_op = 'DELETE' then old else new end;
    perform berth_emit('node', case tg_op when 'INSERT' then 'created' when 'UPDATE' then 'updated' else 'deleted' end,
        r.id, null, null, r.id);
    return null;
end $$;

-- Inserts and deletes always emit; updates only when a column really changed. For nodes,
-- a heartbeat alone (last_heartbeat_at, updated_at) emits nothing: the manager finds silent
-- nodes by time, and heartbeats would otherwise flood the stream.
create trigger apps_events_iud after insert or delete on apps
    for each row execute function berth_event_apps();
create trigger apps_events_u after update on apps
    for each row when (old.* is distinct from new.*) execute function berth_event_apps();
create trigger deployments_events_iud after insert or delete on deployments
    for each row execute function berth_event_deployments();
create trigger deployments_events_u after update on deployments
    for each row when (old.* is distinct from new.*) execute function berth_event_deployments();
create trigger image_builds_events_iud after insert or delete on image_builds
    for each row execute function berth_event_image_builds();
create trigger image_builds_events_u after update on image_builds
    for each row when (old.* is distinct from new.*) execute function berth_event_image_builds();
create trigger instances_events_iud after insert or delete on instances
    for each row execute function berth_event_instances();
create trigger instances_events_u after update on instances
    for each row when (old.* is distinct from new.*) execute function berth_event_instances();
create trigger deployment_instances_events_iud after insert or delete on deployment_instances
    for each row execute function berth_event_deployment_instances();
create trigger deployment_instances_events_u after update on deployment_instances
    for each row when (old.* is distinct from new.*) execute function berth_event_deployment_instances();
create trigger domains_events_iud after insert or delete on domains
    for each row execute function berth_event_domains();
create trigger domains_events_u after update on domains
    for each row when (old.* is distinct from new.*) execute function berth_event_domains();
create trigger nodes_events_iud after insert or delete on nodes
    for each row execute function berth_event_nodes();
create trigger nodes_events_u after update on nodes
    for each row when ((old.name, old.address, old.labels, old.capacity, old.state)
        is distinct from (new.name, new.address, new.labels, new.capacity, new.state))
    execute function berth_event_nodes();
