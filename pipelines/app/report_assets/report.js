// featscope report: pages rendered from the data/*.js files written by `featscope report`.
// Works from disk (file://) and when served by `featscope serve` (which adds /api/).
"use strict";
const FS = (() => {
  const params = new URLSearchParams(location.search);
  const served = location.protocol.startsWith("http");
  const pad = (n, w) => String(n).padStart(w, "0");
  const shardOf = (id) => Math.floor(id / window.FS_RUN.shard);
  const thumb = (id) => `thumbs/${pad(shardOf(id), 4)}/${id}.jpg`;
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  };
  const loadScript = (src) => new Promise((resolve, reject) => {
    const s = el("script", { src });
    s.onload = resolve;
    s.onerror = () => reject(new Error(`cannot load ${src}`));
    document.head.append(s);
  });
  const main = () => document.getElementById("main");
  const section = (title) => { const s = el("section", {}, el("h2", { text: title })); main().append(s); return s; };
  const imageTile = (id, caption) => el("a", { class: "thumb", href: `image.html?id=${id}` },
    el("img", { src: thumb(id), loading: "lazy", alt: `image ${id}` }), el("div", { text: caption }));
  // activations and distances with the same look everywhere: three significant figures
  const figure = (v) => (Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v).toPrecision(3));
  const table = (rows) => el("table", {}, ...rows.map((r) => el("tr", {}, ...r.map((c, i) =>
    el(i === 0 ? "th" : "td", { text: c == null ? "" : String(c) })))));

  function header() {
    const run = window.FS_RUN;
    document.title = `featscope · ${run.name}`;
    const h = el("header", {}, el("strong", { text: `featscope · ${run.name}  ` }), el("a", { href: "index.html", text: "summary" }));
    for (const layer of run.topk) h.append(el("a", { href: `layer.html?layer=${encodeURIComponent(layer.name)}`, text: `units ${layer.name}` }));
    for (const a of run.atlases || []) h.append(el("a", { href: `atlas.html?layer=${encodeURIComponent(a.layer)}`, text: `atlas ${a.layer}` }));
    document.body.prepend(h);
    staleNotice(h);
  }

  // Whether the report still describes the run: one built before the dataset (or an output it
  // shows) last changed would otherwise show them as they were, as if current. Served, the
  // service says;
  // from disk, the run's manifest-live.js (beside the report folder) holds the live images'
  // stamp, to compare with the one the report was built from, and its outputs-live.js the
  // stamps of the outputs the report shows (paths, sizes and times), each command's last.
  async function staleNotice(after) {
    const say = (text) => after.after(el("p", { class: "stale", role: "alert", text }));
    const notice = (live) => say(`Not current: built from ${window.FS_RUN.images} images, the run has ${live} now; ` +
      "this report was built before the dataset last changed: its lists and pictures show the images as they were " +
      "then" + (served ? "; searches and uploads here answer from the run as it is now" : "") +
      ". The next workflow run or `featscope report` builds it again.");
    try {
      if (served) {
        const response = await fetch("/api/report");
        if (!response.ok) return;
        const state = await response.json();
        if (!state.current && state.dataset_changed) notice(state.live_images);
        else if (!state.current) say(`Not current: ${state.message}.`);
      } else {
        await loadScript("../manifest-live.js");
        const live = window.FS_LIVE;
        if (live && window.FS_RUN.live_stamp && live.stamp !== window.FS_RUN.live_stamp) return notice(live.images);
        await loadScript("../outputs-live.js");
        const changed = changedSources(window.FS_RUN.sources, (window.FS_OUTPUTS || {}).sources);
        if (changed.length) say(`Not current: this report was built before ${listed(changed)} changed: it shows ` +
          "them as they were then. The next workflow run or `featscope report` builds it again.");
      }
    } catch (e) { /* no service, or a report copied away from its run: the page itself is unchanged */ }
  }

  // The paths whose stamps differ between two lists of "path stamp" (derived.since's rule);
  // none where either list is missing (a report built before they were kept).
  function changedSources(built, now) {
    if (!built || !now) return [];
    const path = (entry) => entry.slice(0, entry.lastIndexOf(" "));
    const a = new Set(built), b = new Set(now);
    return [...new Set([...built.filter((x) => !b.has(x)), ...now.filter((x) => !a.has(x))].map(path))].sort();
  }

  // "a, b, c, d and 3 more" (text.listed)
  const listed = (items, shown = 4) =>
    items.slice(0, shown).join(", ") + (items.length > shown ? ` and ${items.length - shown} more` : "");

  async function index() {
    header();
    const run = window.FS_RUN;
    const s = section("Run");
    s.append(table([["dataset", run.dataset], ["images", run.images], ["labels", run.labels], ["model", run.model],
      ["weights", `${run.weights} (sha256 ${(run.weights_sha256 || "").slice(0, 12)}…)`], ["layers", run.layers.join(", ")],
      ["bad inputs", run.bad_inputs], ["featscope", run.featscope_version], ["report built", run.built]]));
    if (run.errors.length) {
      const e = section(`Bad inputs (${run.bad_inputs})`);
      e.append(table([["image_id", "stage", "error", "message", "path"],
        ...run.errors.map((r) => [r.image_id, r.stage, r.error, r.message, r.path])]));
    }
    if (run.timings.length) {
      const total = run.timings.reduce((sum, r) => sum + r.seconds, 0);
      const t = section("Stage timings");
      t.append(el("details", {}, el("summary", { text: `${run.timings.length} stage records, ${total.toFixed(0)} s in all` }),
        table([["stage", "seconds", "finished"], ...run.timings.map((r) => [r.stage, r.seconds, r.finished])])));
    }
    if ((run.history || []).length) {
      const h = section("Run history");
      const last = run.history[run.history.length - 1];
      h.append(el("details", {}, el("summary", { text: `${run.history.length} workflow run${run.history.length === 1 ? "" : "s"}; the last ${last.finished}: ` +
          `${last.status}, +${last.added} new, ${last.edited} edited, ${last.retired} retired, ${last.jobs.length} jobs` }),
        table([["finished", "status", "seconds", "images", "added", "edited", "retired", "jobs"],
          ...run.history.slice().reverse().map((r) => [r.finished, r.status, r.seconds, r.images, r.added, r.edited,
            r.retired, r.jobs.length])])));
    }
    if (run.evaluation?.stale) section("Neighbours: feature space against pixel space").append(el("p", { class: "stale", text: run.evaluation.stale }));
    else if (run.evaluation) {
      const v = section("Neighbours: feature space against pixel space");
      const rows = Object.entries(run.evaluation.layers);
      const labels = [...new Set(rows.flatMap(([, r]) => Object.keys(r.per_label || {})))].sort();
      const k = run.evaluation.k || 10;
      const share = (v) => (typeof v === "number" ? v.toFixed(3) : "-");
      const at = (r, lab) => share((r.per_label?.[lab] || {}).precision_at_k);
      if (labels.length <= 12) {  // one row per space, a column per label
        v.append(table([["space", `precision@${k} of same-label neighbours`, ...labels],
          ...rows.map(([l, r]) => [l, share(r.precision_at_k), ...labels.map((lab) => at(r, lab))])]));
      } else {  // many labels: one row per label, a column per space, every label shown
        v.append(table([[`precision@${k} of same-label neighbours`, ...rows.map(([l]) => l)],
          ["all labels", ...rows.map(([, r]) => share(r.precision_at_k))],
          ...labels.map((lab) => [lab, ...rows.map(([, r]) => at(r, lab))])]));
      }
      for (const warning of Object.values(run.space_warnings || {})) v.append(el("p", { class: "stale recall", text: `Approximate: ${warning}.` }));
    }
    if (served && run.spaces.length) upload(section("Query by upload"));
    for (const m of run.mosaics) {
      if (m.stale) { section(`t-SNE grid of ${m.layer}`).append(el("p", { class: "stale", text: m.stale })); continue; }
      const s2 = section(`t-SNE grid of ${m.layer} (click a tile)`);
      const img = el("img", { class: "mosaic", id: `mosaic-${m.layer}`, src: m.grid, alt: `grid mosaic of ${m.layer}` });
      img.addEventListener("click", (event) => openTile(event, m));
      s2.append(img);
      loadScript(`data/mosaic-${m.layer}.js`).catch((e) => console.warn(e.message));
      const more = el("p");
      if (m.scatter) more.append(el("a", { href: m.scatter, text: "scatter mosaic" }), " ");
      if (m.plot) more.append(el("a", { href: m.plot, text: "labelled t-SNE and PCA plots" }));
      s2.append(more);
    }
    if (run.topk.length) {
      const u = section("Units");
      u.append(el("p", { text: "Each unit's maximally activating images and patches, per layer:" }));
      for (const layer of run.topk) u.append(el("a", { href: `layer.html?layer=${encodeURIComponent(layer.name)}`,
        text: `${layer.name}: ${layer.units} units, top ${layer.k}` }), el("br"));
    }
    if (run.saliency_methods.length) {
      const sa = section("Saliency");
      sa.append(el("p", { text: `Methods: ${run.saliency_methods.join(", ")}. Open an image to see its overlays.` }));
      if (run.trust) sa.append(el("p", {}, el("a", { href: "trust.html", id: "trust-link",
        text: "Saliency trust: how faithful each method's maps are, and whether they change with the model" })));
    }
    if (run.toolbox.length) {
      const g = section("Toolbox gallery");
      g.classList.add("gallery");
      for (const group of run.toolbox) {
        g.append(el("h3", { text: group.heading }));
        for (const item of group.items) {
          const caption = el("figcaption", { text: item.caption });
          if (item.image !== undefined) caption.append(" · ", el("a", { href: `image.html?id=${item.image}`, text: "image page" }));
          g.append(el("figure", {}, el("img", { src: item.src, loading: "lazy", alt: `${group.heading}: ${item.caption}` }),
            ...(item.caption ? [caption] : [])));
        }
      }
    }
  }

  function openTile(event, mosaic) {
    const grid = (window.FS_MOSAIC || {})[mosaic.layer];
    if (!grid) return;
    const box = event.target.getBoundingClientRect();
    const col = Math.floor((event.clientX - box.left) / box.width * mosaic.side);
    const row = Math.floor((event.clientY - box.top) / box.height * mosaic.side);
    const id = (grid[row] || [])[col];
    if (id !== undefined && id >= 0) location.href = `image.html?id=${id}`;
  }

  function upload(s) {
    const run = window.FS_RUN;
    const choose = el("select", { id: "upload-layer" }, ...run.spaces.map((l) => el("option", { value: l, text: l })));
    const input = el("input", { type: "file", id: "upload", accept: "image/*" });
    const status = el("p", { id: "upload-status", class: "muted" });
    const results = el("div", { id: "upload-results", class: "thumbs" });
    input.addEventListener("change", async () => {
      const file = input.files[0];
      if (!file) return;
      status.textContent = "searching…";
      results.replaceChildren();
      const response = await fetch(`/api/neighbours?layer=${encodeURIComponent(choose.value)}&k=${run.k}`,
        { method: "POST", body: file });
      const answer = await response.json();
      if (!response.ok) { status.textContent = `error: ${answer.error}`; return; }
      const caveats = [answer.warning,
        answer.unindexed ? `${answer.unindexed} of the run's images are not in its index yet, and no answer names them` : ""];
      status.textContent = `${answer.neighbours.length} nearest images in ${answer.layer}:` +
        caveats.filter(Boolean).map((c) => ` (${c})`).join("");
      for (const n of answer.neighbours) results.append(imageTile(n.image_id, `${n.label ?? n.image_id} · d ${figure(n.distance)}`));
    });
    s.append(el("p", { text: "An image of your own, embedded with the run's model: " }), choose, " ", input, status, results);
  }

  async function image() {
    header();
    const run = window.FS_RUN;
    const id = Number(params.get("id"));
    await loadScript(`data/images-${pad(shardOf(id), 4)}.js`).catch(() => {});
    const entry = (window.FS_IMAGES || {})[id];
    if (!entry) { main().append(el("p", { text: `no image ${id} in this report` })); return; }
    const s = section(`Image ${id}`);
    s.append(el("div", { class: "hero" }, el("img", { src: thumb(id), alt: `image ${id}` })),
      table([["label", entry.label], ["predicted", (entry.prediction || []).map(([name, p]) => `${name} (${p.toFixed(2)})`).join(", ") || "-"],
        ["file", entry.name], ["shard", entry.shard]]));
    for (const space of run.spaces || []) {
      const found = entry.neighbours[space];
      const unindexed = (run.unindexed || {})[space];  // live images the index lacks: added since it was built
      if (!found && !(entry.unindexed || []).includes(space)) continue;
      const title = space === run.pixels ? "Neighbours in pixel space" : `Neighbours in ${space} feature space`;
      const n = section(title);
      if (unindexed) {
        const update = `\`featscope index build --layer ${space}\`, then \`featscope report\``;
        n.append(el("p", { class: "stale unindexed", text: found
          ? `The ${space} index lacks ${unindexed} of the run's images, added since it was built: they are in no ` +
            `list, and this one may miss a nearer image among them. ${update} brings them in.`
          : `This image is not in the ${space} index yet (it lacks ${unindexed} of the run's images, added since it ` +
            `was built): ${update} lists its neighbours.` }));
        if (!found) continue;
      }
      const warning = (run.space_warnings || {})[space];
      if (warning) n.append(el("p", { class: "stale recall", text: `Approximate: ${warning}.` }));
      const pair = el("div", { class: "pair", "data-space": space });
      n.append(el("div", { class: "thumbs neighbours", "data-space": space }, ...found.map(([nid, d]) => {
        const tile = imageTile(nid, `${nid} · d ${figure(d)}`);
        if (space === run.pixels) return tile;
        return el("span", { class: "tile" }, tile, el("button", { class: "why", title: "which regions make the two match",
          text: "why?", onclick: () => explainPair(pair, entry, id, nid, space) }));
      })), pair);
    }
    if (entry.saliency.length) {
      const sa = section("Saliency");
      sa.append(el("p", { class: "muted", text: "Each method's map over the image and on its own. Deletion AUC: the " +
        "class probability as the map's most important pixels are blurred away first (lower is more faithful); insertion " +
        "AUC: as they are revealed first (higher is more faithful); in brackets the same for a random map." }));
      sa.append(el("div", { class: "overlays" }, ...entry.saliency.map((m) => {
        const auc = (entry.auc || {})[m];
        const caption = auc ? `${m}: deletion ${auc[0].toFixed(3)} (random ${auc[2].toFixed(3)}) · insertion ` +
          `${auc[1].toFixed(3)} (random ${auc[3].toFixed(3)})` : m;
        return el("figure", { class: "saliency", "data-method": m },
          el("img", { src: `pictures/saliency/${m}/${id}.png`, alt: `${m} saliency overlay`, loading: "lazy" }),
          el("img", { src: `pictures/saliency/${m}/${id}-map.png`, alt: `${m} saliency map`, loading: "lazy" }),
          el("figcaption", { text: caption }));
      })));
    }
  }

  // Why image `id` and its neighbour `other` match in `space`: the pair's picture, from disk
  // where `featscope explain` made it, else from the query service.
  async function explainPair(box, entry, id, other, space) {
    box.replaceChildren(el("p", { class: "muted", text: `explaining ${id} ~ ${other}…` }));
    const stored = ((entry.explained || {})[space] || []).find(([n]) => n === other);
    if (stored) {
      box.replaceChildren(el("p", { text: `${space}: similarity ${figure(stored[1])} (${stored[2]}); each map shows ` +
        "how much each region of its image adds to it (on a red-blue scale, blue regions take away)." }),
        el("img", { src: `pictures/explain/${space}/${id}-${other}.png`, alt: "pair explanation" }));
      return;
    }
    if (!served && (window.FS_RUN.explained_stale || []).includes(space)) {
      box.replaceChildren(el("p", { class: "stale", text: `The pairs of ${space} on disk were explained for the ` +
        "neighbours of an earlier index, so they are not shown: open the report through `featscope serve` to explain " +
        "any pair, or see `featscope status` for what explains them again." }));
      return;
    }
    if (!served) {
      box.replaceChildren(el("p", { class: "muted", text: "This pair was not explained when the report was made: open " +
        "the report through `featscope serve` to explain any pair, or run `featscope explain --pair " + `${id},${other} ` +
        `--layer ${space}\`.` }));
      return;
    }
    const response = await fetch(`/api/explain?a=${id}&b=${other}&layer=${encodeURIComponent(space)}`);
    const answer = await response.json();
    if (!response.ok) { box.replaceChildren(el("p", { text: `error: ${answer.error}` })); return; }
    box.replaceChildren(el("p", { text: `${space}: similarity ${figure(answer.similarity)} by ${answer.how}; each ` +
      "map shows how much each region of its image adds to it (on a red-blue scale, blue regions take away)." }),
      el("img", { src: answer.picture, alt: "pair explanation" }));
  }

  async function trust() {
    header();
    const run = window.FS_RUN;
    const t = run.trust;
    if (!t) { main().append(el("p", { text: "this run has no saliency evaluation: run `featscope saliency evaluate`" })); return; }
    const ci = (v) => `${v[0].toFixed(3)} [${v[1].toFixed(3)}, ${v[2].toFixed(3)}]`;
    const f = section("Faithfulness: deletion and insertion");
    f.append(el("p", { class: "muted", text: "Per method, over its evaluated images: the mean area under the curve of the " +
      "target class's score as pixels are deleted (lower is better) or inserted (higher is better) in the order the map " +
      "ranks them, with 95% confidence intervals; beside it the same for a seeded random map and a centred Gaussian on the " +
      "same images, and the paired difference from the random map (a faithful map's deletion difference is below 0, its " +
      "insertion difference above 0)." }));
    f.append(table([["method", "images", "deletion", "random", "centre", "deletion − random", "insertion", "random", "centre",
      "insertion − random"], ...Object.entries(t.faithfulness).map(([m, v]) => [m, v.images, ci(v.deletion),
      ci(v.random_deletion), ci(v.centre_deletion), ci(v.deletion_minus_random), ci(v.insertion), ci(v.random_insertion),
      ci(v.centre_insertion), ci(v.insertion_minus_random)])]));
    const verdicts = Object.entries(t.sanity || {});
    if (verdicts.length) {
      const s = section("Sanity check: model randomisation");
      if (t.sanity_stale) s.append(el("p", { class: "stale", text: t.sanity_stale }));
      s.append(el("p", { class: "muted", text: "Each method's maps recomputed as the model's layers are re-initialised " +
        "from the top, and compared with the original maps (Adebayo et al. 2018). A map that barely changes while the " +
        "weights it should explain are destroyed shows the image, not the model." }));
      s.append(table([["method", "verdict", "mean rank correlation", "after the last step", "threshold", "images", "steps"],
        ...verdicts.map(([m, v]) => [m, v.verdict, v.score.toFixed(3), v.final_spearman.toFixed(3), v.threshold, v.images,
          `${v.steps} (${v.granularity})`])]));
      s.classList.add("gallery");
      for (const [m, v] of verdicts) s.append(el("figure", {}, el("img", { src: v.plot, alt: `${m} randomisation curves` }),
        el("figcaption", { text: `${m}: ${v.verdict}` })));
    }
  }

  async function layer() {
    header();
    const run = window.FS_RUN;
    const name = params.get("layer");
    const info = run.topk.find((l) => l.name === name);
    if (!info) { main().append(el("p", { text: `no top-k for layer ${name}` })); return; }
    await loadScript(`data/topk-${name}.js`);
    const units = window.FS_TOPK[name];
    const rendered = new Set(info.rendered);
    const visualised = Object.keys(info.visualised || {}).map(Number).sort((a, b) => a - b);
    if (visualised.length || info.atlas) {
      // Microscope's layout: every rendered unit at a glance, each a link to its page
      const g = section(`${name}: feature visualisations`);
      if (info.atlas) g.append(el("p", {}, el("a", { href: `atlas.html?layer=${encodeURIComponent(name)}`,
        text: `the activation atlas of ${name}` }), " — the space its activations fill, cell by cell"));
      g.append(el("div", { class: "vis-grid" }, ...visualised.map((u) => el("a", { href: `unit.html?layer=${encodeURIComponent(name)}&unit=${u}`,
        title: `unit ${u}` }, el("img", { src: `pictures/units/${name}/unit-${pad(u, 4)}.png`, loading: "lazy", alt: `unit ${u} visualisation` }),
        el("span", { text: String(u) })))));
    }
    const s = section(`${name}: ${info.units} units, each with its top ${info.k} images` +
      (info.shown === "mask" ? " (where each unit fires: its activation mask, top 0.5% over the dataset)" : ""));
    if (info.stale) s.append(el("p", { class: "stale", text: info.stale }));
    for (let u = 0; u < info.units; u++) {
      const link = el("a", { class: "unit", href: `unit.html?layer=${encodeURIComponent(name)}&unit=${u}` }, el("div", { text: `unit ${u}` }));
      if ((info.visualised || {})[u]) link.append(el("img", { class: "vis", src: `pictures/units/${name}/unit-${pad(u, 4)}.png`,
        loading: "lazy", alt: `unit ${u} visualisation` }));
      if (rendered.has(u)) link.append(el("img", { src: `pictures/patches/${name}/unit-${pad(u, 4)}.png`, loading: "lazy", alt: `unit ${u}` }));
      else link.append(el("div", { class: "strip" }, ...(units[u] || []).slice(0, 5).map(([i]) =>
        el("img", { src: thumb(i), loading: "lazy", alt: `image ${i}` }))));
      s.append(link);
    }
  }

  async function unit() {
    header();
    const name = params.get("layer");
    const u = Number(params.get("unit"));
    await loadScript(`data/topk-${name}.js`);
    const info = window.FS_RUN.topk.find((l) => l.name === name);
    const s = section(`${name}, unit ${u}`);
    if (info.stale) s.append(el("p", { class: "stale", text: info.stale }));
    const vis = (info.visualised || {})[u];
    if (vis) s.append(el("figure", { class: "vis" }, el("img", { src: `pictures/units/${name}/unit-${pad(u, 4)}.png`,
      alt: "feature visualisation" }), el("figcaption", { text: `feature visualisation: activation ${figure(vis[0])}` +
      (vis[1] ? ` (dataset top-1 ${figure(vis[1])}, ${figure(vis[0] / vis[1])}x)` : "") +
      (vis[2] ? `; on this image the unit ranks ${vis[2]} of the layer's units` : "") })));
    if (vis && vis[3]) s.append(el("figure", { class: "vis variants" }, ...Array.from({ length: vis[3] }, (_, k) =>
      el("img", { src: `pictures/units/${name}/unit-${pad(u, 4)}-v${k + 1}.png`, alt: `diverse visualisation ${k + 1}` })),
      el("figcaption", { text: `${vis[3]} more, optimised together to differ from each other (diversity objective)` })));
    const named = (info.labels || {})[u];
    if (named) s.append(el("p", { class: "unit-label", text: `label: ${named[0]} (AUC ${named[1].toFixed(3)} of its ` +
      `per-image maximum, one vs rest` + (named[2] !== null ? `; ${(named[2] * 100).toFixed(0)}% of its top images)` : ")") +
      (named[3] ? `; supports the classes ${named[3].join(", ")}` + (named[4] ? ` (${named[4]})` : "") : "") }));
    const histogram = (window.FS_TOPK[`${name}:histograms`] || {})[u];
    if (histogram) s.append(histogramFigure(histogram));
    if (info.rendered.includes(u)) s.append(el("figure", { class: "patches" }, el("img", { src: `pictures/patches/${name}/unit-${pad(u, 4)}.png`,
      alt: "patches" }), el("figcaption", { text: info.shown === "mask" ? "its top images, outlined where its activation is " +
      "in its top 0.5% over the dataset (NetDissect's mask; the rest dimmed)" : "its top images, cropped to the receptive field of " +
      "its strongest cell" })));
    s.append(el("p", { class: "muted", text: "Its top images, each with the unit's activation:" }),
      el("div", { class: "thumbs" }, ...(window.FS_TOPK[name][u] || []).map(([i, v]) => imageTile(i, `image ${i} · ${figure(v)}`))));
    const nav = el("p");
    if (u > 0) nav.append(el("a", { href: `unit.html?layer=${encodeURIComponent(name)}&unit=${u - 1}`, text: "← previous" }), " ");
    if (u + 1 < info.units) nav.append(el("a", { href: `unit.html?layer=${encodeURIComponent(name)}&unit=${u + 1}`, text: "next →" }));
    s.append(nav);
  }

  // A unit's activations over the whole dataset (the extraction's sketch): bars on a log
  // scale, since most cells of a ReLU layer sit at zero; the mask threshold as a red line.
  function histogramFigure([lo, hi, counts, threshold]) {
    const w = 360, h = 110, ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h + 16}`);
    svg.setAttribute("class", "histogram");
    const top = Math.log10(Math.max(...counts) + 1) || 1;
    const bw = w / counts.length;
    counts.forEach((c, i) => {
      const r = document.createElementNS(ns, "rect");
      const bh = (Math.log10(c + 1) / top) * h;
      r.setAttribute("x", i * bw); r.setAttribute("y", h - bh); r.setAttribute("width", Math.max(bw - 1, 1)); r.setAttribute("height", bh);
      svg.append(r);
    });
    const label = (x, text, anchor) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x);
      t.setAttribute("y", h + 13); t.setAttribute("text-anchor", anchor); t.textContent = text; svg.append(t); };
    label(0, figure(lo), "start"); label(w, figure(hi), "end");
    if (threshold !== null && hi > lo) {
      const x = ((threshold - lo) / (hi - lo)) * w;
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", x); line.setAttribute("x2", x); line.setAttribute("y1", 0); line.setAttribute("y2", h);
      line.setAttribute("class", "threshold"); svg.append(line);
    }
    return el("figure", { class: "histogram" }, svg, el("figcaption", { text: "its activations over every position of every image " +
      `(log scale)` + (threshold !== null ? `; red: the mask threshold ${figure(threshold)}` : "") }));
  }

  // The activation atlas: cells at their place in the layout, zoomable; a click lists the
  // images whose activations landed in the cell.
  async function atlas() {
    header();
    const name = params.get("layer");
    const info = (window.FS_RUN.atlases || []).find((a) => a.layer === name);
    if (!info) { main().append(el("p", { text: `no activation atlas of layer ${name}: run featscope units atlas` })); return; }
    await loadScript(`data/atlas-${name}.js`);
    const data = window.FS_ATLAS;
    const s = section(`${name}: activation atlas`);
    s.append(el("p", { class: "muted", text: `${info.cells} cells of a ${info.grid}×${info.grid} grid, ${info.rendered} rendered, ` +
      `from activation vectors of ${info.images} sampled images laid out by ${info.layout}; each cell is drawn from its ` +
      "mean activation vector (Carter et al. 2019). Click a cell for its images." }));
    let zoom = 1;
    const grid = el("div", { class: "atlas-grid", style: `grid-template-columns: repeat(${data.grid}, var(--cell))` });
    const setZoom = (z) => { zoom = Math.min(6, Math.max(0.5, z)); grid.style.setProperty("--cell", `${Math.round(48 * zoom)}px`); };
    setZoom(1);
    s.append(el("p", {}, el("button", { text: "−", onclick: () => setZoom(zoom / 1.25) }), " ",
      el("button", { text: "+", onclick: () => setZoom(zoom * 1.25) }), el("span", { class: "muted", text: "  or ctrl + wheel over the atlas" })));
    grid.addEventListener("wheel", (e) => { if (e.ctrlKey) { e.preventDefault(); setZoom(zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)); } });
    const byPlace = new Map(data.cells.map((c) => [`${c[0]}-${c[1]}`, c]));
    const detail = el("div", { class: "atlas-detail" });
    for (let gy = 0; gy < data.grid; gy++) for (let gx = 0; gx < data.grid; gx++) {
      const c = byPlace.get(`${gy}-${gx}`);
      if (!c) { grid.append(el("div", { class: "cell empty" })); continue; }
      const [, , count, label, labelShare, cls, classShare, rendered, ids] = c;
      const title = `${count} vectors · ${label ?? "no label"}` + (cls ? ` · ${cls}` : "");
      const cell = el("button", { class: "cell", title, "data-cell": `${gy}-${gx}`, onclick: () => {
        detail.replaceChildren(el("h3", { text: `cell (${gy}, ${gx}): ${count} activation vectors` }),
          el("p", { text: (label ? `most common label ${label} (${Math.round(labelShare * 100)}%)` : "no labels") +
            (cls ? `; most common class ${cls} (${Math.round(classShare * 100)}%)` : "") }),
          el("div", { class: "thumbs" }, ...ids.map((i) => imageTile(i, `image ${i}`))));
        detail.scrollIntoView({ block: "nearest" });
      } });
      if (rendered) cell.append(el("img", { src: `pictures/units/${name}/atlas/cell-${pad(gy, 3)}-${pad(gx, 3)}.png`, alt: title, loading: "lazy" }));
      else cell.append(el("span", { text: String(count) }));
      grid.append(cell);
    }
    s.append(el("div", { class: "atlas-wrap" }, grid), detail);
  }

  return { index, image, layer, unit, trust, atlas };
})();
