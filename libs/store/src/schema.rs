// The tables of migrations/, as diesel sees them (kept by hand; `diesel print-schema` with
// diesel.toml at the workspace root regenerates it).

diesel::table! {
    workers (id) {
        id -> Text,
        labels -> Jsonb,
        schedulable -> Bool,
        last_heartbeat -> Timestamptz,
        registered_at -> Timestamptz,
    }
}

diesel::table! {
    gpus (worker_id, idx) {
        worker_id -> Text,
        idx -> Int4,
        name -> Text,
        uuid -> Text,
        total_bytes -> Int8,
        system_reserved_bytes -> Int8,
        reserved_bytes -> Int8,
        used_outside_bytes -> Int8,
    }
}

diesel::table! {
    instances (id) {
        id -> Text,
        spec -> Nullable<Jsonb>,
        desired -> Text,
        state -> Text,
        reason -> Nullable<Text>,
        cmd_seq -> Int8,
        version -> Int8,
        worker_id -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        endpoint -> Nullable<Text>,
        restarts -> Int4,
    }
}

diesel::table! {
    allocations (instance_id, worker_id, gpu_idx, version) {
        instance_id -> Text,
        worker_id -> Text,
        gpu_idx -> Int4,
        version -> Int8,
        bytes -> Int8,
        replica_group -> Nullable<Text>,
        ready -> Bool,
    }
}

diesel::table! {
    event_outbox (seq) {
        seq -> Int8,
        instance_id -> Text,
        state -> Text,
        version -> Int8,
        cmd_seq -> Int8,
        worker_id -> Nullable<Text>,
        gpus -> Array<Int4>,
        reason -> Nullable<Text>,
        at -> Timestamptz,
        endpoint -> Nullable<Text>,
        restarts -> Int4,
    }
}

diesel::joinable!(gpus -> workers (worker_id));
diesel::joinable!(allocations -> instances (instance_id));
diesel::allow_tables_to_appear_in_same_query!(workers, gpus, instances, allocations, event_outbox);

diesel::table! {
    api_keys (id) {
        id -> Int8,
        name -> Text,
        scope -> Text,
        prefix -> Text,
        hash -> Bytea,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}
