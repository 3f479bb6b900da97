"""Probe (not a product path): a nearest-neighbour memory of fine-grid Lite0 features beside CFM.

Per category: Lite0 blocks (default 1, 2, 4) brought to a G x G grid (default 56, stride 4),
3 x 3 averaged (PatchCore's local pooling), valid (on-part) cells only; memory = a random
30 000 / 8 000 / 3 000 cells of 100 training parts; a test part's kNN score = its largest
nearest-neighbour distance. CFM's score from the cfm-tiny bundle. Combined: each score
z-scored with the validation (good) parts, then max (``zmax``) or sum (``zsum``). Prints one
line per (category, score) with image AUROC, overall and per defect type.

    python scripts/cfm_probe_knn_fine.py puck,box,cookie,bagel,cable 1,2,4 56

(reads runs/cfm_offline2/synth and runs/cfm_offline2/bundles/off-tiny-<category>: the
cfm-tiny bundles of blocks 4,7 on the R/8 grid, see docs/results.md)
"""
import sys, numpy as np, torch, torch.nn.functional as F, time, json
torch.set_num_threads(1)
from edge_runtime.hostmem import retain_freed_memory; retain_freed_memory()
from edge_runtime.backends import load_detector
from edge_runtime.data.mvtec import MVTec3D
from edge_runtime.nets.efficientnet_weights import build_efficientnet
from edge_runtime.metrics import image_auroc
from edge_runtime.data.depth import IMAGENET_MEAN, IMAGENET_STD
data = "runs/cfm_offline2/synth"
cats = sys.argv[1].split(","); blocks = tuple(int(b) for b in sys.argv[2].split(",")); G = int(sys.argv[3])
net, _ = build_efficientnet("efficientnet-lite0", blocks); net.fuse_for_inference()
mean_w, std_w = net.normalisation
scale = (torch.tensor(IMAGENET_STD) / torch.tensor(std_w)).view(1,3,1,1); shift = ((torch.tensor(IMAGENET_MEAN) - torch.tensor(mean_w)) / torch.tensor(std_w)).view(1,3,1,1)
BANKS = (30000, 8000, 3000)
out = {}
for cat in cats:
    det = load_detector(f"runs/cfm_offline2/bundles/off-tiny-{cat}", backend="torch", device="cpu")
    ds = MVTec3D(data)
    def feats(ref, cfm=False):
        s = ref.load(); inp = det.preprocess(s.rgb, s.xyz)
        rgb = torch.from_numpy(inp["rgb"])[None]; xyz = torch.from_numpy(inp["xyz"])[None]
        with torch.inference_mode():
            fs = net(rgb * scale + shift)
        maps = [F.adaptive_avg_pool2d(f, G) if f.shape[-1] > G else F.interpolate(f, size=(G, G), mode="bilinear", align_corners=False) for f in fs]
        m = F.avg_pool2d(torch.cat(maps, 1), 3, 1, 1)
        v = F.adaptive_avg_pool2d((xyz.abs().sum(-1) > 0).float()[None], G)[0, 0] > 0.5
        c = det.infer(inp).score if cfm else None
        return m[0].permute(1, 2, 0)[v], s, c
    bank = torch.cat([feats(r)[0] for r in ds.index(cat, "train")[:100]])
    g = torch.Generator().manual_seed(0); perm = torch.randperm(len(bank), generator=g)
    banks = {n: bank[perm[:n]] for n in BANKS}
    def run(split):
        rows = []
        for ref in ds.index(cat, split):
            f, s, c = feats(ref, cfm=True)
            rows.append((s.label, s.defect_type, c, *[float(torch.cdist(f, banks[n]).min(1).values.max()) for n in BANKS]))
        return rows
    val, test = run("validation"), run("test")
    out[cat] = {"val": val, "test": test}
    lab = np.array([r[0] for r in test]); types = np.array([r[1] for r in test])
    V = np.array([r[2:] for r in val]); T = np.array([r[2:] for r in test])
    z = (T - V.mean(0)) / V.std(0)
    def rep(name, sc):
        per = {t: round(image_auroc(sc[(lab == 0) | (types == t)], lab[(lab == 0) | (types == t)]), 2) for t in sorted(set(types)) if t != "good"}
        print(cat, name, "%.3f" % image_auroc(sc, lab), per, flush=True)
    rep("cfm", T[:, 0])
    for i, n in enumerate(BANKS):
        rep(f"knn{n}", T[:, 1 + i]); rep(f"zmax{n}", np.maximum(z[:, 0], z[:, 1 + i])); rep(f"zsum{n}", z[:, 0] + z[:, 1 + i])
json.dump(out, open(f"runs/cfm_offline2/probe_knn_fine_{sys.argv[2].replace(',','')}_{G}.json", "w"))
