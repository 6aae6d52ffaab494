"""The network, the front end, the weights format and the converter (issue 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import model
from model import FeatureConfig, LogMelSpectrogram, WeightsError, runtime
from model.convert import convert
from model.weights import file_sha256, write_manifest
from tests import seed_reference as seed
from tests.conftest import SHIPPED_WEIGHTS, speech

ROOT = Path(__file__).resolve().parents[1]


def randomise_bn(net: nn.Module) -> None:
    """Give BatchNorm non-trivial statistics so a mis-mapped key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("factory", [model.ResNet18, model.ResNet34, model.ResNet50, model.ResNet101, model.ResNet152])
def test_every_depth_gives_logits_and_embedding(factory):
    net = factory().eval()
    with torch.inference_mode():
        logits, embedding = net(torch.randn(2, 1, 80, 300))
    assert logits.shape == (2, 9)
    assert embedding.shape == (2, 256)


def test_layer_names_and_sizes_follow_the_seed():
    net = model.ResNet18(num_classes=5, embedding_size=128)
    assert net.conv1.in_channels == 1 and net.conv1.out_channels == 64 and net.conv1.kernel_size == (3, 3)
    assert net.avg_pool.output_size == (4, 1)
    assert net.fc.in_features == 512 * 4 and net.fc.out_features == 128
    assert net.linear.out_features == 5
    assert model.ResNet50().fc.in_features == 512 * 4 * 4


def test_forward_does_not_copy_its_input():
    net = model.ResNet18().eval()
    x = torch.randn(1, 1, 80, 100, requires_grad=True)
    logits, _ = net(x)
    logits.sum().backward()
    assert x.grad is not None  # a copied input would cut the graph


@pytest.mark.parametrize("seconds", [0.5, 60.0])
def test_short_and_long_clips_run_end_to_end(seconds):
    fe = LogMelSpectrogram().eval()
    net = model.ResNet18().eval()
    wave = torch.randn(int(16000 * seconds)) * 0.1
    with torch.inference_mode():
        feats = fe(wave)
        logits, emb = net(feats)
    assert feats.shape == (1, 1, 80, fe.num_frames(wave.numel()))
    assert logits.shape == (1, 9) and emb.shape == (1, 256)
    assert torch.isfinite(emb).all()


def test_front_end_is_deterministic_and_batch_consistent():
    fe = LogMelSpectrogram().eval()
    waves = torch.randn(3, 24000) * 0.1
    batch = fe(waves)
    single = torch.cat([fe(w) for w in waves])
    assert torch.allclose(batch, single, atol=1e-5)
    assert torch.equal(fe(waves[0]), fe(waves[0]))
    # mean normalisation over time: every mel band has zero mean
    assert batch.mean(dim=-1).abs().max() < 1e-4


def test_feature_config_rejects_nonsense():
    with pytest.raises(ValueError, match="f_max"):
        FeatureConfig(f_max=9000)
    with pytest.raises(ValueError, match="unknown feature config keys"):
        FeatureConfig.from_dict({"dither": 1.0})


def seed_network(kind: str) -> nn.Module:
    net = seed.ResNet50() if kind == "resnet50" else seed.ResNet18(projection=kind)
    randomise_bn(net)
    return net.eval()


CHECKPOINT_CASES = [
    (kind, wrap) for kind in ("downsample", "shortcut") for wrap in (None, "state_dict", "dataparallel")
] + [("resnet50", None), ("resnet50", "dataparallel")]


@pytest.mark.parametrize(("kind", "wrap"), CHECKPOINT_CASES)
def test_seed_checkpoint_converts_and_reproduces_outputs(tmp_path, kind, wrap):
    net = seed_network(kind)
    state = net.state_dict()
    if wrap == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    saved = {"state_dict": state, "epoch": 3} if wrap == "state_dict" else state
    ckpt = tmp_path / "seed.pt"
    torch.save(saved, ckpt)

    arch = "resnet50" if kind == "resnet50" else "resnet18"
    labels = [f"speaker{i}" for i in range(9)]
    convert(ckpt, tmp_path / "w", arch, labels=labels)
    loaded = model.load(tmp_path / "w")

    x = torch.randn(2, 1, 80, 200)
    with torch.inference_mode():
        want_logits, want_emb = net(x)
        got_logits, got_emb = loaded.network(x)
    assert (want_logits - got_logits).abs().max() < 1e-5
    assert (want_emb - got_emb).abs().max() < 1e-5
    assert loaded.labels == labels
    assert not loaded.network.training


def test_loaded_model_takes_any_rate_and_channel_count(tmp_path):
    from model.audio import Audio

    net = seed_network("downsample")
    torch.save(net.state_dict(), tmp_path / "seed.pt")
    convert(tmp_path / "seed.pt", tmp_path / "w", "resnet18")
    loaded = model.load(tmp_path / "w")
    t = torch.arange(44100 * 2) / 44100
    tone = (0.3 * torch.sin(2 * torch.pi * 220 * t)).numpy()
    stereo = Audio(samples=__import__("numpy").stack([tone, tone]).astype("float32"), sample_rate=44100)
    wave = loaded.prepare(stereo)
    assert wave.shape == (32000,)
    result = loaded.infer(wave)
    assert result.logits.shape == (9,) and result.embedding.shape == (256,) and result.windows == 1
    # a long clip is averaged over windows
    long_result = loaded.infer(wave.repeat(15), window_s=10.0)
    assert long_result.windows == 3


@pytest.fixture()
def weights_dir(tmp_path):
    net = seed_network("downsample")
    torch.save(net.state_dict(), tmp_path / "seed.pt")
    convert(tmp_path / "seed.pt", tmp_path / "w", "resnet18")
    return tmp_path / "w"


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_corrupted_tensor_file_is_refused(weights_dir):
    f = weights_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as exc:
        model.load(weights_dir)
    msg = one_line(exc)
    assert "model.safetensors" in msg and "sha256" in msg


def test_wrong_architecture_in_manifest_is_refused(weights_dir):
    m = weights_dir / "manifest.json"
    data = json.loads(m.read_text())
    data["architecture"] = "resnet34"
    m.write_text(json.dumps(data))
    with pytest.raises(WeightsError) as exc:
        model.load(weights_dir)
    msg = one_line(exc)
    assert "resnet34" in msg and "missing keys" in msg


def test_missing_key_is_refused(tmp_path):
    state = seed_network("downsample").state_dict()
    del state["layer2.0.downsample.1.running_var"]
    torch.save(state, tmp_path / "seed.pt")
    with pytest.raises(WeightsError) as exc:
        convert(tmp_path / "seed.pt", tmp_path / "w", "resnet18")
    assert "layer2.0.downsample.1.running_var" in one_line(exc)


def test_pickled_whole_model_is_refused_without_unpickling(tmp_path):
    torch.save(seed_network("downsample"), tmp_path / "whole.pt")
    with pytest.raises(WeightsError) as exc:
        convert(tmp_path / "whole.pt", tmp_path / "w", "resnet18")
    msg = one_line(exc)
    assert "state_dict()" in msg
    assert not (tmp_path / "w").exists()


def test_unknown_manifest_fields_and_bad_json_are_refused(weights_dir):
    m = weights_dir / "manifest.json"
    m.write_text("{not json")
    with pytest.raises(WeightsError) as exc:
        model.load(weights_dir)
    assert "manifest.json" in one_line(exc)


@pytest.mark.parametrize(
    ("centroids", "threshold", "problem"),
    [
        ([[0.0] * 256] * 8, 0.5, "class_centroids must be 9 rows of 256"),
        ([[0.0] * 255] * 9, 0.5, "class_centroids must be 9 rows of 256"),
        ([[float("nan")] * 256] * 9, 0.5, "class_centroids must be 9 rows of 256"),
        ([[0.1] * 256] * 9, None, "go together"),
        ([[0.1] * 256] * 9, 1.5, "known_threshold must be a cosine"),
    ],
)
def test_open_set_manifest_fields_are_checked(weights_dir, centroids, threshold, problem):
    m = weights_dir / "manifest.json"
    data = json.loads(m.read_text())
    assert data["class_centroids"] is None and data["known_threshold"] is None  # converted: none
    assert model.load(weights_dir).nearest_class(torch.randn(256)) is None
    data["class_centroids"], data["known_threshold"] = centroids, threshold
    m.write_text(json.dumps(data))
    with pytest.raises(WeightsError) as exc:
        model.load(weights_dir)
    assert problem in one_line(exc)


def test_nearest_class_uses_the_stored_centroids(weights_dir):
    m = weights_dir / "manifest.json"
    data = json.loads(m.read_text())
    data["class_centroids"] = torch.eye(9, 256).tolist()
    data["known_threshold"] = 0.8
    m.write_text(json.dumps(data))
    loaded = model.load(weights_dir)
    assert loaded.nearest_class(3 * torch.eye(9, 256)[5]) == (5, pytest.approx(1.0), True)
    mixed = torch.eye(9, 256)[2] + torch.eye(9, 256)[7] * 0.9
    index, score, known = loaded.nearest_class(mixed)
    assert index == 2 and score < 0.8 and known is False


def with_cohort(weights_dir: Path, cohort: torch.Tensor, top: int, threshold: float) -> model.EmbeddingModel:
    """The converted weights with unit-vector centroids, background voices and a known threshold."""
    loaded = model.load(weights_dir)
    m = loaded.manifest
    m.class_centroids, m.known_threshold = torch.eye(9, 256).tolist(), threshold
    m.cohort, m.known_cohort = cohort, {"top": top}
    write_manifest(weights_dir, m)
    return model.load(weights_dir)


def test_background_voices_lower_the_known_score_of_a_clip_near_them(weights_dir):
    # background voice 0 lies between classes 2 and 7, voice 1 far from every class
    cohort = torch.zeros(2, 256)
    cohort[0, 2], cohort[0, 7], cohort[1, 100] = 1.0, 1.0, 1.0
    loaded = with_cohort(weights_dir, cohort, 1, 0.2)
    entry = loaded.manifest.known_cohort
    assert entry is not None and entry["file"] == "cohort.safetensors" and entry["voices"] == 2 and entry["top"] == 1
    assert (weights_dir / "cohort.safetensors").is_file()
    # a clip of class 5 is nearer it than any background voice: known, score cosine - 0
    assert loaded.nearest_class(torch.eye(9, 256)[5]) == (5, pytest.approx(1.0), True)
    # nearer class 2 than anything (cosine 0.74) but nearer still background voice 0 (0.99):
    # a voice like a training voice, none of the classes
    mixed = torch.eye(9, 256)[2] + torch.eye(9, 256)[7] * 0.9
    index, score, known = loaded.nearest_class(mixed)
    cos2 = 1 / (1 + 0.81) ** 0.5
    assert index == 2 and score == pytest.approx(cos2 - 1.9 / (2 * 1.81) ** 0.5, abs=1e-3) and known is False
    # the known score is a difference of cosines: a threshold in [-2, 2] is accepted with a cohort only
    data = json.loads((weights_dir / "manifest.json").read_text())
    data["known_threshold"] = -1.5
    (weights_dir / "manifest.json").write_text(json.dumps(data))
    assert model.load(weights_dir).manifest.known_threshold == -1.5
    del data["known_cohort"]
    (weights_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="known_threshold must be a cosine"):
        model.load(weights_dir)


def test_adaptive_s_norm_scores_each_side_against_its_own_background_voices(weights_dir):
    # 40 background voices on 40 axes; clip "crowded" leans on 10 of them (as a clip in noise
    # scores high against many voices), clip "lone" on none
    cohort = torch.eye(40, 256)
    loaded = with_cohort(weights_dir, cohort, 3, 0.1)
    # without verification_norm: scores are plain cosines
    a, b = torch.randn(3, 256), torch.randn(4, 256)
    scores, cosines = loaded.verification_scores(a, b)
    assert torch.equal(scores, cosines) and loaded.norm_statistics(a) is None
    assert torch.allclose(
        cosines, torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    )
    m = loaded.manifest
    m.verification_norm, m.verification_threshold = {"method": "as-norm", "top": 10}, 2.5
    write_manifest(weights_dir, m)
    loaded = model.load(weights_dir)
    assert loaded.norm_top == 10 and loaded.manifest.verification_threshold == 2.5  # not a cosine: accepted
    target = torch.zeros(256)
    target[200], target[20:40] = 1.0, torch.linspace(0.0, 0.2, 20)  # a voice, a little like some of them
    lean = torch.zeros(256)
    lean[:10] = torch.linspace(0.2, 0.4, 10)
    crowded, lone = target + lean, target.clone()
    lone[100:110] = lean[:10]  # the same length and cosine to the voice, away from every background voice
    voice = torch.stack([target])
    s, c = loaded.verification_scores(torch.stack([crowded, lone]), voice)
    assert c[0, 0] == pytest.approx(float(c[1, 0]), abs=1e-6)  # one cosine to the voice ...
    assert s[0, 0] < s[1, 0]  # ... but the clip near every background voice scores lower
    stats = loaded.norm_statistics(voice)
    assert torch.equal(loaded.verification_scores(torch.stack([crowded, lone]), voice, stats)[0], s)
    # each side as standard deviations above its own top-10 background cosines, averaged
    u = torch.nn.functional.normalize(torch.stack([crowded, target]), dim=-1)
    top = (u @ cohort.T).topk(10, dim=-1).values
    z = [(float(c[0, 0]) - float(t.mean())) / float(t.std()) for t in top]
    assert float(s[0, 0]) == pytest.approx(sum(z) / 2, rel=1e-4)
    assert torch.allclose(s[:, 0], loaded.verification_scores(voice, torch.stack([crowded, lone]))[0][0])  # symmetric
    # refused: without background voices, a top beyond them, another method
    data = json.loads((weights_dir / "manifest.json").read_text())
    for change, problem in (
        ({"known_cohort": None, "class_centroids": None, "known_threshold": None}, "needs known_cohort"),
        ({"verification_norm": {"method": "as-norm", "top": 41}}, "an integer from 2 to 40"),
        ({"verification_norm": {"method": "z-norm", "top": 10}}, "must be"),
        ({"verification_norm": None, "verification_threshold": 2.5}, "verification_threshold must be a cosine"),
    ):
        (weights_dir / "manifest.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(WeightsError) as exc:
            model.load(weights_dir)
        assert problem in one_line(exc)


def test_cohort_statistics_of_many_voiceprints_match_one_block():
    # an /identify index larger than a block gets the same statistics as computed at once
    cohort = torch.nn.functional.normalize(torch.randn(50, 32), dim=-1)
    prints = torch.randn(runtime.STATISTICS_BLOCK + 7, 32)
    nearest = (torch.nn.functional.normalize(prints, dim=-1) @ cohort.T).topk(5, dim=-1).values
    stats = runtime.cohort_statistics(prints, cohort, 5)
    assert torch.allclose(stats, torch.stack([nearest.mean(-1), nearest.std(-1)], dim=-1), atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "replaced", "wrong shape", "entry without centroids"])
def test_a_damaged_cohort_is_refused_with_one_line(weights_dir, damage):
    with_cohort(weights_dir, torch.randn(4, 256), 3, 0.1)
    path, manifest = weights_dir / "cohort.safetensors", weights_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "replaced":
        safetensors.torch.save_file({"embeddings": torch.randn(4, 256).half()}, str(path))
    elif damage == "wrong shape":
        safetensors.torch.save_file({"embeddings": torch.randn(4, 255).half()}, str(path))
        data["known_cohort"]["sha256"] = file_sha256(path)
    else:
        data["class_centroids"] = data["known_threshold"] = None
    manifest.write_text(json.dumps(data))
    with pytest.raises(WeightsError) as exc:
        model.load(weights_dir)
    expected = {
        "missing": "cohort.safetensors: missing",
        "replaced": "sha256 does not match",
        "wrong shape": "of shape (4, 256)",
        "entry without centroids": "known_cohort needs class_centroids",
    }[damage]
    assert expected in one_line(exc)


def test_a_cohort_the_manifest_would_refuse_is_not_written(weights_dir):
    loaded = with_cohort(weights_dir, torch.randn(4, 256), 3, 0.1)
    before = file_sha256(weights_dir / "cohort.safetensors")
    m = loaded.manifest
    m.cohort, m.known_cohort = torch.randn(2, 256), {"top": 3}  # 3 nearest of 2 voices
    with pytest.raises(ValueError, match="more than its 2 voices"):
        write_manifest(weights_dir, m)
    assert file_sha256(weights_dir / "cohort.safetensors") == before
    assert sorted(p.name for p in weights_dir.iterdir() if "cohort" in p.name) == ["cohort.safetensors"]
    assert model.load(weights_dir).manifest.known_cohort["voices"] == 4


def test_recalibrating_without_background_voices_removes_the_cohort_file(weights_dir):
    loaded = with_cohort(weights_dir, torch.randn(4, 256), 3, 0.1)
    m = loaded.manifest
    m.cohort = m.known_cohort = None
    m.known_threshold = 0.5
    write_manifest(weights_dir, m)
    assert not (weights_dir / "cohort.safetensors").exists()
    again = model.load(weights_dir)
    assert again.manifest.known_cohort is None and again.manifest.cohort is None


def test_convert_cli_reports_one_clean_line(tmp_path):
    torch.save(seed_network("downsample"), tmp_path / "whole.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "model.convert", str(tmp_path / "whole.pt"), str(tmp_path / "w"), "--arch", "resnet18"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "state_dict()" in proc.stderr
    torch.save(seed_network("downsample").state_dict(), tmp_path / "ok.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.convert",
            str(tmp_path / "ok.pt"),
            str(tmp_path / "w"),
            "--arch",
            "resnet18",
            "--labels",
            ",".join("abcdefghi"),
            "--n-mels",
            "64",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = model.load(tmp_path / "w")
    assert loaded.manifest.features.n_mels == 64 and loaded.labels == list("abcdefghi")


def test_the_network_converted_for_openvino_is_kept_and_read_back(tmp_path, caplog):
    loaded = model.load(SHIPPED_WEIGHTS)
    wave = speech(4)
    cache = tmp_path / "cache"
    first = model.load(SHIPPED_WEIGHTS).configure("fp32", backend="openvino", cache_dir=cache)
    (entry,) = cache.iterdir()  # one entry, whole: no half-written conversion left beside it
    assert sorted(p.name for p in entry.iterdir()) == ["network.bin", "network.xml"]
    again = model.load(SHIPPED_WEIGHTS).configure("fp32", backend="openvino", cache_dir=cache)
    a, b = first.infer(wave).embedding, again.infer(wave).embedding
    assert torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, loaded.infer(wave).embedding, dim=0) > 0.9999
    # other weights get their own entry; a cache that cannot be written only costs the time
    other = model.load(SHIPPED_WEIGHTS)
    other.manifest.sha256 = "0" * 64
    other.configure("fp32", backend="openvino", cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    with caplog.at_level("WARNING"):
        works = model.load(SHIPPED_WEIGHTS).configure("fp32", backend="openvino", cache_dir=blocked / "cache")
    assert torch.equal(works.infer(wave).embedding, a) and "converted at every start" in caplog.text
