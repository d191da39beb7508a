"""KD strategies, losses and targets (kdaug.train.strategies, kdaug.train.kd) with tiny random-weight models on CPU."""

from __future__ import annotations

import pytest
import torch
from scipy.spatial.transform import Rotation

from kdaug.data.batch import batch_from_frames
from kdaug.data.lmdb import LmdbWriter
from kdaug.data.training_set import TrainingSet, collate
from kdaug.errors import KdaugError
from kdaug.models import EdgeFeatures, ModelOutput, load_model
from kdaug.models.protocol import TAPS
from kdaug.train.kd import TeacherTargets, default_kd_lambda, edge_to_node, edge_to_vector
from kdaug.train.strategies import STRATEGIES, LiveTeacher, build_kd_head, check_pair, get_strategy
from kdaug.train.losses import LossWeights
from tests.conftest import emt_frames

MSE = {"loss": "mse", "l0_weights": LossWeights()}

# strategy -> (teacher, student): GemNet-OC's edge taps feed PaiNN; PaiNN teaches SchNet node features and outputs.
PAIRS = {
    "none": ("painn-tiny", "schnet-tiny"),
    "vanilla1": ("painn-tiny", "schnet-tiny"),
    "vanilla2": ("painn-tiny", "schnet-tiny"),
    "n2n": ("painn-tiny", "schnet-tiny"),
    "e2n": ("gemnet-oc-tiny", "painn-tiny"),
    "v2v": ("gemnet-oc-tiny", "painn-tiny"),
    "hessian": ("painn-tiny", "schnet-tiny"),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: load_model(name) for name in ("painn-tiny", "schnet-tiny", "gemnet-oc-tiny")}


@pytest.fixture(scope="module")
def two_frames():
    return emt_frames(2)


@pytest.fixture(scope="module")
def training_batch(tmp_path_factory, two_frames):
    """The two frames as `kdaug train` batches them (dataset_idx and local_idx included)."""
    path = tmp_path_factory.mktemp("kd") / "data"
    with LmdbWriter(path) as writer:
        writer.write_batch(two_frames)
    data = TrainingSet([path])
    yield collate([data[0], data[1]])
    data.close()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_declares_its_taps_and_its_loss_falls(models, training_batch, name):
    strategy = get_strategy(name)
    assert strategy.name == name and name in PAIRS, "give every strategy a tiny pair here"
    assert set(strategy.teacher_taps) | set(strategy.student_taps) <= set(TAPS)
    teacher_name, student_name = PAIRS[name]
    teacher = models[teacher_name]
    torch.manual_seed(1)
    student = load_model(student_name)  # fresh weights: this test trains it
    check_pair(strategy, student, teacher)
    batch = training_batch.clone()
    assert set(teacher(batch, taps=strategy.teacher_taps).taps) == set(strategy.teacher_taps)
    targets = LiveTeacher(teacher, strategy).targets(batch)
    for field in strategy.cache_fields():
        assert targets.field(field).shape[0] == batch.pos.shape[0], field  # per atom
    head = build_kd_head(strategy, student, LiveTeacher(teacher, strategy), batch)
    assert strategy.needs_head == (head.projection is not None)
    optimizer = torch.optim.AdamW([*student.parameters(), *head.parameters()], lr=3e-3)
    weights = torch.tensor([1.0, 0.5])
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        if strategy.needs_pos_grad:
            batch.pos.requires_grad_(True)
        output = student(batch, taps=strategy.student_taps)
        assert set(output.taps) == set(strategy.student_taps)
        loss = strategy.loss(student, batch, output, head(output), targets, weights, **MSE)
        if not strategy.uses_teacher:
            assert loss.item() == 0 and not strategy.teacher_taps and not strategy.student_taps
            return
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_head_shapes_and_the_vector_map_has_no_bias(models, two_frames):
    batch = batch_from_frames(two_frames)
    teacher = LiveTeacher(models["gemnet-oc-tiny"], get_strategy("n2n"))
    n2n = build_kd_head(get_strategy("n2n"), models["painn-tiny"], teacher, batch)
    v2v = build_kd_head(get_strategy("v2v"), models["painn-tiny"], LiveTeacher(models["gemnet-oc-tiny"],
                                                                                get_strategy("v2v")), batch)
    assert n2n.projection.bias is not None and v2v.projection.bias is None
    assert get_strategy("vanilla2").head().projection is None
    assert list(get_strategy("vanilla1").head().parameters()) == []


def live_features(name, teacher, frames):
    return LiveTeacher(teacher, get_strategy(name)).targets(batch_from_frames(frames)).features


def rotated(frames, seed):
    rotation = Rotation.random(random_state=seed).as_matrix()
    moved = [f.replace(positions=f.positions @ rotation.T, cell=f.cell @ rotation.T) for f in frames]
    return moved, torch.tensor(rotation, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_v2v_teacher_vectors_rotate_with_the_input(models, two_frames, seed):
    teacher = models["gemnet-oc-tiny"]
    base = live_features("v2v", teacher, two_frames)
    moved_frames, rotation = rotated(two_frames, seed)
    moved = live_features("v2v", teacher, moved_frames)
    assert base.shape[1] == 3 and base.abs().max() > 1e-3
    torch.testing.assert_close(moved, torch.einsum("ij,njd->nid", rotation, base), atol=2e-4, rtol=1e-3)
    e2n = live_features("e2n", teacher, two_frames)
    e2n_moved = live_features("e2n", teacher, moved_frames)
    torch.testing.assert_close(e2n_moved, e2n, atol=2e-4, rtol=1e-3)


def small_graph():
    """4 atoms, 6 directed edges (source, target) with 5 channels, vectors from source to target."""
    torch.manual_seed(2)
    pos = torch.tensor([[0.0, 0, 0], [1.5, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])
    edge_index = torch.tensor([[0, 1, 2, 0, 3, 1], [1, 0, 0, 2, 1, 3]])
    diff = pos[edge_index[1]] - pos[edge_index[0]]
    return pos, EdgeFeatures(torch.randn(6, 5), edge_index, diff / diff.norm(dim=1, keepdim=True))


def test_e2n_sums_edge_features_onto_the_target_atom():
    _, edge = small_graph()
    expected = torch.zeros(4, 5)
    for e in range(6):
        expected[int(edge.edge_index[1, e])] += edge.features[e]
    torch.testing.assert_close(edge_to_node(edge, 4), expected)
    assert edge_to_node(edge, 4)[2].abs().sum() > 0 and torch.equal(edge_to_node(edge, 4)[2], edge.features[3])


def test_v2v_is_the_papers_sum_of_unit_vectors_towards_neighbours():
    pos, edge = small_graph()
    expected = torch.zeros(4, 3, 5)
    for e in range(6):
        source, target = int(edge.edge_index[0, e]), int(edge.edge_index[1, e])
        u = (pos[source] - pos[target]) / (pos[source] - pos[target]).norm()  # u_ij, i the target, j its neighbour
        expected[target] += u[:, None] * edge.features[e][None, :]
    torch.testing.assert_close(edge_to_vector(edge, 4), expected)


def test_gemnet_edge_vectors_point_from_source_to_target(models, two_frames):
    """The convention edge_to_vector relies on: vector_e = unit(pos[target] - image of pos[source])."""
    batch = batch_from_frames(two_frames)
    edge = models["gemnet-oc-tiny"](batch, taps=["edge"]).taps["edge"]
    source, target = edge.edge_index
    shifts = torch.cartesian_prod(*[torch.arange(-2.0, 3.0)] * 3)  # lattice images (positions get wrapped)
    cells = batch.cell[batch.batch[target]]  # (E, 3, 3)
    diff = (batch.pos[target] - batch.pos[source])[:, None, :] - torch.einsum("kj,eji->eki", shifts, cells)
    directions = diff / diff.norm(dim=2, keepdim=True)
    best = (directions - edge.vectors[:, None, :]).norm(dim=2).min(dim=1).values
    assert best.max() < 1e-4


def test_feature_loss_weights_each_atom_by_its_system():
    batch = batch_from_frames(emt_frames(2))
    n = batch.pos.shape[0]
    torch.manual_seed(3)
    student_node, target = torch.randn(n, 4), torch.randn(n, 6)
    n2n = get_strategy("n2n")
    head = n2n.head(4, 6)
    output = ModelOutput(torch.zeros(2), torch.zeros(n, 3), {"node": student_node})
    targets = TeacherTargets(torch.zeros(2), torch.zeros(n, 3), target)
    weights = torch.tensor([2.0, 0.25])
    with torch.no_grad():
        per_atom_mse = (head.projection(student_node) - target).square().mean(dim=1)
        per_atom_mae = (head.projection(student_node) - target).abs().mean(dim=1)
    atom_weights = weights[batch.batch]
    mapped = head(output)
    torch.testing.assert_close(n2n.loss(None, batch, output, mapped, targets, weights, **MSE),
                               (atom_weights * per_atom_mse).mean())
    mae = n2n.loss(None, batch, output, mapped, targets, weights, loss="mae", l0_weights=LossWeights())
    torch.testing.assert_close(mae, (atom_weights * per_atom_mae).mean())
    torch.testing.assert_close(n2n.loss(None, batch, output, mapped, targets, None, **MSE), per_atom_mse.mean())
    with pytest.raises(KdaugError, match="^--kd-loss huber: expected one of mse, mae$"):
        n2n.loss(None, batch, output, mapped, targets, None, loss="huber", l0_weights=LossWeights())


def test_vanilla2_is_the_absolute_error_of_atom_energies():
    batch = batch_from_frames(emt_frames(1))
    n = batch.pos.shape[0]
    student, teacher = torch.linspace(-1, 1, n), torch.linspace(1, -2, n)
    output = ModelOutput(torch.zeros(1), torch.zeros(n, 3), {"atom_energy": student})
    vanilla2 = get_strategy("vanilla2")
    teacher_output = ModelOutput(torch.zeros(1), torch.zeros(n, 3), {"atom_energy": teacher})
    targets = TeacherTargets(torch.zeros(1), torch.zeros(n, 3), vanilla2.target_features(teacher_output, n))
    torch.testing.assert_close(vanilla2.loss(None, batch, output, vanilla2.head()(output), targets, None, **MSE),
                               (student - teacher).abs().mean())


def test_pairs_that_cannot_do_a_mode_are_refused_naming_kd(models):
    with pytest.raises(KdaugError, match=r"^--kd v2v: student schnet-tiny has no vector features"):
        check_pair(get_strategy("v2v"), models["schnet-tiny"], models["gemnet-oc-tiny"])
    with pytest.raises(KdaugError, match=r"^--kd e2n: teacher painn-tiny has no edge features.*--kd none, vanilla1"):
        check_pair(get_strategy("e2n"), models["schnet-tiny"], models["painn-tiny"])
    direct_off = load_model("painn-tiny")
    direct_off.implemented_taps = direct_off.implemented_taps - {"vector"}  # as PaiNN without direct_forces
    with pytest.raises(KdaugError, match="--kd v2v: student painn-tiny has no vector"):
        check_pair(get_strategy("v2v"), direct_off, None)
    with pytest.raises(KdaugError, match="^--kd n3n: expected one of none, vanilla1, "):
        get_strategy("n3n")
    for strategy in STRATEGIES.values():
        check_pair(strategy, models["painn-tiny"], models["gemnet-oc-tiny"])


def test_default_lambda_is_table_7():
    n2n, v2v, vanilla2, e2n = (get_strategy(name) for name in ("n2n", "v2v", "vanilla2", "e2n"))
    assert default_kd_lambda("gemnet-oc", "painn-big", n2n) == 10000
    assert default_kd_lambda("gemnet_oc", "painn-big", v2v) == 50000
    assert default_kd_lambda("painn-big", "painn-small", vanilla2) == 200
    assert default_kd_lambda("painn-big", "schnet", n2n) == 1000
    assert default_kd_lambda("painn-big", "schnet", n2n, dataset="coll") == 100
    assert default_kd_lambda("painn-big", "schnet", e2n) is None
    assert default_kd_lambda("gemnet-oc-tiny", "painn-tiny", n2n) is None


def test_train_cache_and_study_configs_read_the_one_strategy_list():
    import dataclasses
    import typing

    from kdaug.study.config import KdLambdas, StudyConfig
    from kdaug.train.config import TrainConfig
    from kdaug.train.teacher_cache import TeacherCacheConfig

    for cls in (TrainConfig, TeacherCacheConfig):
        assert typing.get_args(typing.get_type_hints(cls)["kd"]) == tuple(STRATEGIES)
    strategies = typing.get_type_hints(StudyConfig)["strategies"]
    assert typing.get_args(typing.get_args(strategies)[0]) == tuple(STRATEGIES)
    assert [f.name for f in dataclasses.fields(KdLambdas)] == [n for n, s in STRATEGIES.items() if s.uses_teacher]
    assert "hessian" in STRATEGIES and KdLambdas(hessian=2.0).hessian == 2.0
