//! Planner tables on fake inventories and synthetic model facts, plus properties over generated
//! cases. No GPU needed.

use rand::{Rng, SeedableRng};

use super::*;
use crate::gpu::inventory::Gpu;

const GIB: u64 = 1024 * 1024 * 1024;
const MB: u64 = 1_000_000;

fn gpu(name: &str, bus: &str, total: u64, used: u64, cc: [u32; 2], display: bool) -> Gpu {
    Gpu {
        name: name.into(),
        uuid: format!("GPU-{bus}"),
        pci_bus_id: bus.into(),
        memory_total: total,
        memory_free: total - used,
        memory_used: used,
        compute_capability: cc,
        utilization_percent: Some(0),
        temperature_celsius: None,
        power_watts: None,
        display_attached: display,
        other_process_memory: used,
        remote: None,
    }
}

fn rtx3060() -> Gpu {
    // A display using 500 MB.
    gpu(
        "NVIDIA GeForce RTX 3060",
        "00000000:01:00.0",
        12 * GIB,
        500 * MB,
        [8, 6],
        true,
    )
}

fn gtx1060() -> Gpu {
    gpu(
        "NVIDIA GeForce GTX 1060 6GB",
        "00000000:02:00.0",
        6 * GIB,
        0,
        [6, 1],
        false,
    )
}

fn inventory(gpus: Vec<Gpu>) -> Inventory {
    Inventory {
        gpus,
        ram_available: 120 * GIB,
        driver_version: Some("550.54".into()),
        unavailable: None,
    }
}

fn owner() -> Inventory {
    inventory(vec![rtx3060(), gtx1060()])
}

// A table row per model reads better than a builder here.
#[allow(clippy::too_many_arguments)]
/// Q4_K_M-like facts: `layer` bytes per block, GQA with 8 KV heads of 128 (64 for 1B).
fn model(
    name: &str,
    n_layer: u32,
    layer: u64,
    n_embd: u64,
    head_dim: u64,
    vocab: u64,
    output: u64,
    embd: u64,
) -> ModelFacts {
    ModelFacts {
        architecture: name.into(),
        n_layer,
        n_ctx_train: 131072,
        n_embd,
        n_head: 32,
        n_vocab: vocab,
        n_head_kv: vec![8; n_layer as usize],
        key_length: head_dim,
        value_length: head_dim,
        sliding_window: None,
        swa_layers: Vec::new(),
        layer_bytes: vec![layer; n_layer as usize],
        output_bytes: output,
        embedding_bytes: embd,
        file_bytes: layer * u64::from(n_layer) + output + embd,
    }
}

fn llama_1b() -> ModelFacts {
    model(
        "llama-1b",
        16,
        30 * MB,
        2048,
        64,
        128_256,
        215 * MB,
        215 * MB,
    )
}
fn llama_8b() -> ModelFacts {
    model(
        "llama-8b",
        32,
        135 * MB,
        4096,
        128,
        128_256,
        430 * MB,
        290 * MB,
    )
}
fn qwen_14b() -> ModelFacts {
    model(
        "qwen-14b",
        48,
        170 * MB,
        5120,
        128,
        152_064,
        640 * MB,
        430 * MB,
    )
}
fn llama_70b() -> ModelFacts {
    model(
        "llama-70b",
        80,
        515 * MB,
        8192,
        128,
        128_256,
        860 * MB,
        580 * MB,
    )
}

fn config(n_ctx: u32, policy: Policy) -> PlanConfig {
    PlanConfig {
        n_ctx,
        policy,
        ..PlanConfig::default()
    }
}

/// Every layer placed exactly once, in contiguous ranges ending at the last layer, each device
/// within its budget.
fn assert_valid(plan: &Plan, model: &ModelFacts) {
    let mut next = plan.cpu_layers;
    for device in &plan.devices {
        assert_eq!(device.first_layer, next, "contiguous: {plan:#?}");
        assert!(device.end_layer >= device.first_layer);
        assert!(device.total <= device.budget, "within budget: {device:#?}");
        assert_eq!(device.headroom, device.budget - device.total);
        next = device.end_layer;
    }
    assert_eq!(next, model.n_layer, "every layer placed: {plan:#?}");
    let on_gpus: u32 = plan.tensor_split.iter().sum();
    assert_eq!(on_gpus + plan.cpu_layers, model.n_layer);
    let output_offloaded = plan.devices.iter().any(|d| d.output > 0);
    assert_eq!(plan.n_gpu_layers, on_gpus + u32::from(output_offloaded));
}

fn device<'a>(plan: &'a Plan, name_part: &str) -> &'a DevicePlan {
    plan.devices
        .iter()
        .find(|d| d.name.contains(name_part))
        .expect("device in plan")
}

fn headroom_fraction(d: &DevicePlan) -> f64 {
    d.headroom as f64 / d.budget as f64
}

#[test]
fn owner_8b_proportional_puts_everything_on_gpus_with_equal_headroom_and_output_on_the_3060() {
    let m = llama_8b();
    let plan = plan(&m, &owner(), &config(8192, Policy::Proportional)).unwrap();
    assert_valid(&plan, &m);
    assert_eq!(plan.cpu_layers, 0);
    assert_eq!(plan.n_gpu_layers, 33, "32 layers + output");
    let (big, small) = (device(&plan, "3060"), device(&plan, "1060"));
    assert!(
        big.output > 0 && small.output == 0,
        "output on the larger card"
    );
    assert_eq!(
        plan.devices.last().unwrap().name,
        big.name,
        "the output card is last in device order"
    );
    let layer = (m.layer_bytes[0] + 8 * 256 * 2 * 8192) as f64;
    let tolerance = layer / small.budget as f64 + 0.02;
    assert!(
        (headroom_fraction(big) - headroom_fraction(small)).abs() <= tolerance,
        "equal headroom: {:.3} vs {:.3}",
        headroom_fraction(big),
        headroom_fraction(small)
    );
    assert!(plan.reasons.iter().any(|r| r.contains("display attached")));
}

#[test]
fn the_display_card_gets_a_larger_margin() {
    let with = default_margin(&rtx3060());
    let mut no_display = rtx3060();
    no_display.display_attached = false;
    assert_eq!(with - default_margin(&no_display), 256 * 1024 * 1024);
    assert_eq!(
        default_margin(&gtx1060()),
        512 * 1024 * 1024,
        "5 % of 6 GiB is under 512 MiB"
    );
}

#[test]
fn prefer_fast_fills_the_3060_first_with_the_output_layer() {
    // 14B with 16k context: ~13 GB, more than the 3060's budget alone.
    let m = qwen_14b();
    let plan = plan(&m, &owner(), &config(16384, Policy::PreferFast)).unwrap();
    assert_valid(&plan, &m);
    let (fast, slow) = (device(&plan, "3060"), device(&plan, "1060"));
    assert!(fast.output > 0);
    assert_eq!(plan.devices.last().unwrap().name, fast.name);
    // The fast card is full: adding one more layer would exceed its budget.
    let next_layer = m.layer_bytes[0] + 8 * 256 * 2 * 16384;
    assert!(fast.headroom < next_layer, "{fast:#?}");
    assert!(slow.end_layer - slow.first_layer > 0);
}

#[test]
fn the_pci_order_of_the_cards_does_not_change_the_plan() {
    let m = llama_8b();
    let mut swapped_3060 = rtx3060();
    swapped_3060.pci_bus_id = "00000000:02:00.0".into();
    let mut swapped_1060 = gtx1060();
    swapped_1060.pci_bus_id = "00000000:01:00.0".into();
    let swapped = inventory(vec![swapped_1060, swapped_3060]);
    for policy in [Policy::Proportional, Policy::PreferFast] {
        let a = plan(&m, &owner(), &config(8192, policy)).unwrap();
        let b = plan(&m, &swapped, &config(8192, policy)).unwrap();
        let layers = |p: &Plan| -> Vec<(String, u32, u32)> {
            p.devices
                .iter()
                .map(|d| (d.name.clone(), d.first_layer, d.end_layer))
                .collect()
        };
        assert_eq!(layers(&a), layers(&b), "{policy:?}");
    }
}

#[test]
fn a_70b_model_offloads_the_last_layers_and_keeps_the_rest_and_the_output_on_the_cpu() {
    let m = llama_70b();
    for policy in [Policy::Proportional, Policy::PreferFast] {
        let plan = plan(&m, &owner(), &config(8192, policy)).unwrap();
        assert_valid(&plan, &m);
        assert!(plan.cpu_layers > 40, "{}", plan.cpu_layers);
        assert!(plan.devices.iter().all(|d| d.output == 0));
        assert_eq!(plan.n_gpu_layers, 80 - plan.cpu_layers);
        // 41 GB of layers against ~16 GiB of budgets: well over half stays in host memory.
        assert!(plan.cpu_bytes > 20 * GIB, "{}", plan.cpu_bytes);
        assert!(plan.reasons.iter().any(|r| r.contains("stay on the CPU")));
    }
}

#[test]
fn a_model_that_fits_nowhere_fails_before_loading_naming_the_numbers() {
    let mut small_host = owner();
    small_host.ram_available = 16 * GIB;
    let err = plan(
        &llama_70b(),
        &small_host,
        &config(8192, Policy::Proportional),
    )
    .unwrap_err();
    let PlanError::DoesNotFit(message) = err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("GiB") && message.contains("8192"),
        "{message}"
    );
    assert!(
        message.contains("no context fits"),
        "70B weights alone exceed VRAM + RAM: {message}"
    );
    // A context too large for an 8B model on a small host names a context that would fit.
    let mut tiny = inventory(vec![gtx1060()]);
    tiny.ram_available = 4 * GIB;
    let err = plan(&llama_8b(), &tiny, &config(131072, Policy::Proportional)).unwrap_err();
    let PlanError::DoesNotFit(message) = err else {
        panic!("{err:?}")
    };
    assert!(message.contains("--ctx-size"), "{message}");
}

#[test]
fn one_24_gib_card_takes_a_1b_model_whole() {
    let m = llama_1b();
    let inv = inventory(vec![gpu(
        "NVIDIA GeForce RTX 4090",
        "00000000:01:00.0",
        24 * GIB,
        300 * MB,
        [8, 9],
        false,
    )]);
    let plan = plan(&m, &inv, &config(131072, Policy::Proportional)).unwrap();
    assert_valid(&plan, &m);
    assert_eq!(plan.n_gpu_layers, 17);
    assert_eq!(plan.tensor_split, vec![16]);
}

#[test]
fn without_gpus_or_without_cuda_everything_stays_on_the_cpu() {
    let m = llama_8b();
    let mut none = inventory(Vec::new());
    none.unavailable =
        Some("NVML unavailable (libnvidia-ml.so.1 not found); running on the CPU".into());
    let plan_none = plan(&m, &none, &config(4096, Policy::Proportional)).unwrap();
    assert_eq!((plan_none.n_gpu_layers, plan_none.cpu_layers), (0, 32));
    assert!(plan_none.reasons[0].contains("NVML unavailable"));
    let cpu_build = PlanConfig {
        cuda: false,
        ..config(4096, Policy::Proportional)
    };
    let plan_cpu = plan(&m, &owner(), &cpu_build).unwrap();
    assert_eq!(plan_cpu.n_gpu_layers, 0);
    assert!(plan_cpu.reasons[0].contains("no CUDA backend"));
}

#[test]
fn a_card_below_the_builds_compute_capability_is_skipped_with_a_reason() {
    let m = llama_8b();
    let old = gpu(
        "NVIDIA GeForce GTX 780",
        "00000000:03:00.0",
        3 * GIB,
        0,
        [3, 5],
        false,
    );
    let inv = inventory(vec![rtx3060(), old]);
    let plan = plan(&m, &inv, &config(4096, Policy::Proportional)).unwrap();
    assert_valid(&plan, &m);
    assert!(plan.devices.iter().all(|d| d.gpu == 0));
    assert!(plan
        .reasons
        .iter()
        .any(|r| r.contains("GTX 780") && r.contains("3.5")));
}

#[test]
fn n_gpu_layers_is_honoured_and_checked() {
    let m = llama_8b();
    let c = PlanConfig {
        n_gpu_layers: Some(10),
        ..config(4096, Policy::Proportional)
    };
    let capped = plan(&m, &owner(), &c).unwrap();
    assert_valid(&capped, &m);
    assert_eq!((capped.n_gpu_layers, capped.cpu_layers), (10, 22));
    // More layers than the only card can hold: a clear error naming the card and the numbers.
    let c = PlanConfig {
        n_gpu_layers: Some(49),
        devices: Some(vec![1]),
        ..config(4096, Policy::Proportional)
    };
    let err = plan(&qwen_14b(), &owner(), &c).unwrap_err();
    let PlanError::OverBudget(message) = err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("1060") && message.contains("budget"),
        "{message}"
    );
}

#[test]
fn tensor_split_devices_and_split_mode_none_are_honoured() {
    let m = llama_8b();
    let c = PlanConfig {
        tensor_split: Some(vec![1.0, 1.0]),
        ..config(4096, Policy::Proportional)
    };
    let plan_split = plan(&m, &owner(), &c).unwrap();
    assert_valid(&plan_split, &m);
    assert_eq!(plan_split.tensor_split, vec![16, 16]);
    let bad = PlanConfig {
        tensor_split: Some(vec![1.0]),
        ..config(4096, Policy::Proportional)
    };
    assert!(matches!(
        plan(&m, &owner(), &bad),
        Err(PlanError::Override(_))
    ));
    let only_3060 = PlanConfig {
        devices: Some(vec![0]),
        ..config(4096, Policy::Proportional)
    };
    let p = plan(&m, &owner(), &only_3060).unwrap();
    assert_eq!(p.devices.len(), 1);
    assert_eq!(p.devices[0].gpu, 0);
    let none_on_1060 = PlanConfig {
        split_mode: SplitMode::None,
        main_gpu: 1,
        n_gpu_layers: Some(33),
        ..config(8192, Policy::Proportional)
    };
    assert!(matches!(
        plan(&qwen_14b(), &owner(), &none_on_1060),
        Err(PlanError::OverBudget(_))
    ));
    let unknown = PlanConfig {
        devices: Some(vec![5]),
        ..config(4096, Policy::Proportional)
    };
    assert!(matches!(
        plan(&m, &owner(), &unknown),
        Err(PlanError::Override(_))
    ));
}

#[test]
fn generated_cases_place_every_layer_once_within_budget_and_deterministically() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut planned = 0;
    for _ in 0..500 {
        let n_gpus = rng.gen_range(0..4);
        let gpus: Vec<Gpu> = (0..n_gpus)
            .map(|i| {
                let total = rng.gen_range(2..48) * GIB;
                let used = rng.gen_range(0..total / 4);
                let cc = [rng.gen_range(5..10), rng.gen_range(0..10)];
                gpu(
                    &format!("gpu{i}"),
                    &format!("00000000:0{i}:00.0"),
                    total,
                    used,
                    cc,
                    rng.gen_bool(0.3),
                )
            })
            .collect();
        let mut inv = inventory(gpus);
        inv.ram_available = rng.gen_range(4..256) * GIB;
        let n_layer = rng.gen_range(1..100);
        let m = model(
            "gen",
            n_layer,
            rng.gen_range(1..800) * MB,
            4096,
            128,
            128_256,
            500 * MB,
            300 * MB,
        );
        let policy = if rng.gen_bool(0.5) {
            Policy::Proportional
        } else {
            Policy::PreferFast
        };
        let c = config(rng.gen_range(1..64) * 1024, policy);
        match plan(&m, &inv, &c) {
            Ok(p) => {
                assert_valid(&p, &m);
                assert_eq!(plan(&m, &inv, &c).unwrap(), p, "deterministic");
                assert!(p.cpu_bytes <= inv.ram_available);
                planned += 1;
            }
            Err(PlanError::DoesNotFit(_)) => {}
            Err(other) => panic!("no overrides were given, yet {other:?}"),
        }
    }
    assert!(planned > 300, "most generated cases fit: {planned}");
}

#[cfg(feature = "real-model")]
#[test]
fn the_default_model_fits_the_owners_3060() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = crate::gpu::gguf::model_facts(&path).unwrap();
    let p = plan(&m, &owner(), &config(8192, Policy::PreferFast)).unwrap();
    assert_valid(&p, &m);
    assert_eq!(p.n_gpu_layers, 31, "30 layers and the output");
    assert_eq!(p.devices.len(), 2);
    assert_eq!(p.tensor_split, vec![0, 30], "the fast card takes it all");
}

#[test]
fn a_real_h100_inventory_read_through_nvml_takes_a_70b_model_whole() {
    use crate::gpu::inventory::{FileSource, InventorySource};
    // Written by `lm-sandbox gpus --json` on an H100 machine (display flag as `is_display_active`).
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/h100-inventory.json");
    let inv = FileSource(path).read().unwrap();
    assert_eq!(inv.gpus[0].compute_capability, [9, 0]);
    let m = llama_70b();
    let p = plan(&m, &inv, &config(8192, Policy::Proportional)).unwrap();
    assert_valid(&p, &m);
    assert_eq!(p.n_gpu_layers, 81);
    assert!(p.devices[0].headroom > 20 * GIB, "{:#?}", p.devices[0]);
}

/// What `plan` holds, as the registry describes a loaded model to the next load.
fn held(model: &str, plan: &Plan) -> crate::gpu::placement::Held {
    crate::gpu::placement::Held::new(model, plan, &[])
}

/// The next load's view: free memory minus what loaded plans hold, cards they use occupied.
fn with_loaded(c: &PlanConfig, loaded: &[crate::gpu::placement::Held]) -> (Inventory, PlanConfig) {
    let available = crate::gpu::placement::subtract_held(&owner(), loaded);
    let mut c = c.clone();
    c.occupied = loaded
        .iter()
        .flat_map(|h| h.gpus.iter().map(|(bus, _, _)| bus.clone()))
        .collect();
    (available, c)
}

#[test]
fn auto_puts_a_model_that_fits_on_one_card_on_the_fastest_card_alone() {
    let c = config(8192, Policy::Auto);
    let p = plan(&llama_1b(), &owner(), &c).unwrap();
    assert_valid(&p, &llama_1b());
    assert_eq!(p.devices.len(), 1, "{p:#?}");
    assert!(p.devices[0].name.contains("3060"));
    assert_eq!(p.cpu_layers, 0);
    assert!(
        p.reasons
            .iter()
            .any(|r| r.starts_with("auto:") && r.contains("alone")),
        "{:?}",
        p.reasons
    );
    // Proportional, asked for, still spreads it over both cards.
    let spread = plan(&llama_1b(), &owner(), &config(8192, Policy::Proportional)).unwrap();
    assert_eq!(spread.devices.len(), 2);
    // A model no single card holds is split, fastest card first, as prefer-fast does.
    let big = plan(&qwen_14b(), &owner(), &config(32768, Policy::Auto)).unwrap();
    assert_valid(&big, &qwen_14b());
    assert_eq!(big.devices.len(), 2);
    assert!(big.devices.last().unwrap().name.contains("3060"));
    assert!(big
        .reasons
        .iter()
        .any(|r| r.contains("fits on no single card")));
}

#[test]
fn several_models_each_get_their_own_card_then_one_must_go_and_one_never_fits() {
    let c = config(8192, Policy::Auto);
    // The first model takes the fast card alone.
    let first = plan(&llama_8b(), &owner(), &c).unwrap();
    assert_eq!(first.devices.len(), 1);
    assert!(first.devices[0].name.contains("3060"));
    // The second fits either card: it goes on the one no model holds.
    let loaded = [held("llama-8b", &first)];
    let (available, c2) = with_loaded(&c, &loaded);
    let second = plan(&llama_1b(), &available, &c2).unwrap();
    assert_eq!(second.devices.len(), 1);
    assert!(second.devices[0].name.contains("1060"), "{second:#?}");
    assert!(second
        .reasons
        .iter()
        .any(|r| r.contains("that no other model holds")));
    // A third (the 14B, which needs most of both cards) fits beside them only with layers on
    // the CPU (the loader then has the registry unload an idle model first) ...
    let both = [held("llama-8b", &first), held("llama-1b", &second)];
    let (available, c3) = with_loaded(&c, &both);
    let third = plan(&qwen_14b(), &available, &c3).unwrap();
    assert!(third.cpu_layers > 0, "{third:#?}");
    // ... the report names every card's budget and what holds it ...
    let report = crate::gpu::placement::budget_report(&available, &both);
    assert!(
        report.contains("RTX 3060") && report.contains("held by llama-8b"),
        "{report}"
    );
    assert!(
        report.contains("GTX 1060") && report.contains("held by llama-1b"),
        "{report}"
    );
    // ... and fits once the least recently used (the 8B) is unloaded.
    let (available, c4) = with_loaded(&c, &both[1..]);
    let fits = plan(&qwen_14b(), &available, &c4).unwrap();
    assert_valid(&fits, &qwen_14b());
    assert_eq!(fits.cpu_layers, 0, "{fits:#?}");
    // The 70B never fits: even with both cards empty, its host share exceeds the RAM given.
    let mut small_host = owner();
    small_host.ram_available = 16 * GIB;
    assert!(matches!(
        plan(&llama_70b(), &small_host, &c),
        Err(PlanError::DoesNotFit(_))
    ));
}

#[test]
fn held_memory_counts_only_what_is_not_allocated_yet() {
    let c = config(8192, Policy::Auto);
    let first = plan(&llama_8b(), &owner(), &c).unwrap();
    let bytes = first.devices[0].total;
    let bus = first.devices[0].pci_bus_id.clone();
    // Loading: nothing allocated, the whole plan is held back.
    let loading = crate::gpu::placement::Held::new("a", &first, &[]);
    let free = |inv: &Inventory| {
        inv.gpus
            .iter()
            .find(|g| g.pci_bus_id == bus)
            .unwrap()
            .memory_free
    };
    let before = free(&owner());
    assert_eq!(
        free(&crate::gpu::placement::subtract_held(&owner(), &[loading])),
        before - bytes
    );
    // Loaded: NVML already shows what llama.cpp allocated; only the rest is held back.
    let loaded = crate::gpu::placement::Held::new("a", &first, &[(bus.clone(), bytes - 100)]);
    assert_eq!(
        free(&crate::gpu::placement::subtract_held(&owner(), &[loaded])),
        before - 100
    );
}

/// A 24 GB card on an RPC worker, as its worker reports it.
fn remote_24gb() -> Gpu {
    let mut g = gpu("RPC0", "rpc:10.0.0.2:50052/0", 24 * GIB, 0, [0, 0], false);
    g.uuid = String::new();
    g.remote = Some("10.0.0.2:50052".into());
    g
}

fn owner_and_worker() -> Inventory {
    inventory(vec![rtx3060(), gtx1060(), remote_24gb()])
}

#[test]
fn local_cards_take_the_last_layers_and_the_output_and_the_worker_the_layers_before() {
    // A 32B-class model: more than both local cards hold, less than all three.
    let m = model(
        "qwen-32b",
        64,
        300 * MB,
        5120,
        128,
        152_064,
        600 * MB,
        600 * MB,
    );
    let inv = owner_and_worker();
    for policy in [Policy::Auto, Policy::PreferFast] {
        let plan = plan(&m, &inv, &config(8192, policy)).unwrap();
        assert_valid(&plan, &m);
        let order: Vec<&str> = plan.devices.iter().map(|d| d.pci_bus_id.as_str()).collect();
        // llama.cpp device order: the worker first (earliest layers), the 3060 last (output).
        assert_eq!(
            order,
            [
                "rpc:10.0.0.2:50052/0",
                "00000000:02:00.0",
                "00000000:01:00.0"
            ],
            "{policy:?}"
        );
        assert!(plan.devices[2].output > 0, "the output layer stays local");
        assert_eq!(plan.cpu_layers, 0, "{plan:#?}");
        // The local cards are filled (their headroom is less than a layer); the worker takes the rest.
        let layer = m.layer_bytes[0];
        for d in &plan.devices[1..] {
            assert!(d.headroom < 2 * layer, "{d:#?}");
        }
        let remote = &plan.devices[0];
        assert!(remote.end_layer - remote.first_layer > 0);
        assert!(
            plan.reasons
                .iter()
                .any(|r| r.contains("network round trip") && r.contains("1 RPC device")),
            "{:?}",
            plan.reasons
        );
    }
}

#[test]
fn a_model_that_fits_the_local_cards_leaves_the_worker_empty() {
    let m = llama_8b();
    let plan = plan(&m, &owner_and_worker(), &config(8192, Policy::Auto)).unwrap();
    assert_valid(&plan, &m);
    assert!(plan
        .devices
        .iter()
        .all(|d| !d.pci_bus_id.starts_with("rpc:")));
}

#[test]
fn rpc_devices_are_planned_in_a_cpu_build_and_keep_five_percent() {
    // No CUDA backend here: local cards are skipped, the worker still takes layers.
    let m = llama_8b();
    let cfg = PlanConfig {
        cuda: false,
        ..config(8192, Policy::Auto)
    };
    let plan = plan(&m, &owner_and_worker(), &cfg).unwrap();
    assert_valid(&plan, &m);
    assert_eq!(plan.devices.len(), 1);
    assert_eq!(plan.devices[0].pci_bus_id, "rpc:10.0.0.2:50052/0");
    assert_eq!(plan.devices[0].budget, 24 * GIB - 24 * GIB / 20);
    assert!(plan.reasons.iter().any(|r| r.contains("no CUDA backend")));
}
