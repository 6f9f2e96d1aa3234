/* saecircuits report page: lazy plots and the feature browser. No network, no eval; every data string is put into
   the page as text (textContent), never as HTML. Data: #sc-figs (figures) and #sc-browser (features), each JSON,
   or gzip + base64 when large (inflated with DecompressionStream). */
(function () {
  "use strict";
  var PLOT_CONFIG = {displaylogo: false, responsive: true};
  var CARD_PLOT_CONFIG = {displaylogo: false, responsive: true, displayModeBar: false};
  var template = null;

  function readJSON(id) {
    var el = document.getElementById(id);
    if (!el) { return Promise.resolve(null); }
    if (el.getAttribute("data-encoding") !== "gzip-base64") {
      return Promise.resolve(JSON.parse(el.textContent));
    }
    var bin = atob(el.textContent.trim());
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(JSON.parse);
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) { for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) { e.setAttribute(k, attrs[k]); } } }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  function fmt(v, d) {
    if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) { return "n/a"; }
    return v.toFixed(d === undefined ? 4 : d);
  }

  function withCI(m, lo, hi, d) {
    if (m === null || m === undefined) { return "n/a"; }
    if (lo === null || hi === null || lo === undefined || hi === undefined) { return fmt(m, d); }
    return fmt(m, d) + " [" + fmt(lo, d) + ", " + fmt(hi, d) + "]";
  }

  // a share in [0, 1] as a percentage (one decimal below 10%), never rounded to a claim it does not make: a nonzero
  // share that would show as 0 is "<0.1%", one short of the whole that would show as 100 is ">99%" (as
  // saecircuits.display.percent says them in the summaries)
  function pct(x) {
    var d = x < 0.1 ? 1 : 0, t = (100 * x).toFixed(d);
    if (x > 0 && Number(t) === 0) { return "<0.1%"; }
    if (x < 1 && Number(t) === 100) { return ">99%"; }
    return t + "%";
  }

  /* ---------------------------------------------------------------- lazy plots */

  function newPlot(div, fig, config) {
    var layout = Object.assign({}, fig.layout || {});
    if (template && !layout.template) { layout.template = template; }
    div.setAttribute("data-rendered", "1");
    return Plotly.newPlot(div, fig.data || [], layout, config || PLOT_CONFIG);
  }

  var figs = {};
  var observer = null;

  function renderDiv(div) {
    if (div.getAttribute("data-rendered")) { return; }
    var fig = figs[div.id];
    if (fig) { newPlot(div, fig); }
  }

  function watchPlots(root) {
    var divs = (root || document).querySelectorAll("div.plot[data-lazy]");
    for (var i = 0; i < divs.length; i++) {
      if (observer) { observer.observe(divs[i]); } else { renderDiv(divs[i]); }
    }
  }

  /** Render every plot of the page now (for printing or export). */
  function renderAll() {
    var divs = document.querySelectorAll("div.plot[data-lazy]");
    for (var i = 0; i < divs.length; i++) { renderDiv(divs[i]); }
  }

  function openTarget() {
    var id = decodeURIComponent((location.hash || "").slice(1));
    if (!id) { return; }
    if (id.indexOf("card-") === 0 && browser) {
      // a one-feature page's own card is already open at the top: no scrolling down to it
      browser.openFromHash(id, browser.root.getAttribute("data-open") === id);
      return;
    }
    var t = document.getElementById(id);
    for (var p = t; p; p = p.parentElement) { if (p.tagName === "DETAILS") { p.open = true; } }
    if (t) { t.scrollIntoView(); }
  }

  /* ---------------------------------------------------------------- tokens (colours: tokens_html.token_color) */

  function clamp255(x) { return Math.floor(Math.max(0, Math.min(255, x))); }

  function tokenColor(v, max) {
    var r = 255, g = 255, b = 255;
    if (v !== null && v !== undefined && isFinite(v) && max > 0) {
      if (v < 0) { r = g = clamp255(255 * (1 + v / Math.abs(max))); b = 255; }
      else { r = 255; g = b = clamp255(255 * (1 - v / max)); }
    }
    var lum = (0.299 * r + 0.587 * g + 0.114 * b) / 255;
    return ["rgb(" + r + ", " + g + ", " + b + ")", lum > 0.5 ? "black" : "white"];
  }

  function tokensDiv(ex, strings, max, valueName) {
    var div = el("div", {"class": "tokens", dir: "ltr"});
    if (!(max > 0)) {
      max = 0;
      for (var j = 0; j < ex.a.length; j++) {
        if (ex.k.charAt(j) !== "s" && ex.a[j] !== null) { max = Math.max(max, Math.abs(ex.a[j])); }
      }
    }
    for (var i = 0; i < ex.t.length; i++) {
      if (i > 0) { div.appendChild(document.createElement("wbr")); }
      var kind = ex.k.charAt(i);
      // a blank token ("w": whitespace only, or no text at all) is a marked box (tokens_html.blank_token_note)
      var span = el("span", null, kind === "w" ? (strings[ex.t[i]] || "\u2205") : strings[ex.t[i]]);
      if (kind === "s") {
        span.className = "tok special";
        span.title = "special token (BOS/EOS/PAD), position " + i + ": not text, left out of the statistics";
      } else {
        var c = tokenColor(ex.a[i], max);
        span.className = kind === "c" ? "tok cont" : kind === "w" ? "tok ws" : "tok";
        span.style.backgroundColor = c[0];
        span.style.color = c[1];
        span.title = (valueName || "Activation") + ": " + fmt(ex.a[i]) + ", position " + i +
          (kind === "c" ? " (more bytes of the character on the previous token)" :
           kind === "w" ? (strings[ex.t[i]] ? " (whitespace only)" : " (shows no text here)") : "");
      }
      div.appendChild(span);
    }
    return div;
  }

  /* ---------------------------------------------------------------- the feature browser */

  var browser = null;

  function Browser(root, data) {
    this.root = root;
    this.data = data;
    this.strings = data.strings;
    this.sae = 0;
    this.nShown = 60;
    var self = this;
    var bar = el("div", {"class": "fb-bar"});
    if (data.saes.length > 1) {
      this.select = el("select", {id: "fb-sae", "aria-label": "SAE"});
      data.saes.forEach(function (s, i) {
        self.select.appendChild(el("option", {value: String(i)}, "SAE " + i + ": " + s.hook + " (" + s.rows.length + " features)"));
      });
      this.select.addEventListener("change", function () { self.sae = +self.select.value; self.list(); });
      bar.appendChild(this.select);
    }
    this.input = el("input", {id: "fb-search", type: "search", placeholder: "feature number or token, e.g. 123 or said",
                              "aria-label": "search features", autocomplete: "off"});
    this.input.addEventListener("input", function () { self.list(); });
    this.input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        var first = self.tbody.querySelector("tr[data-f]");
        if (first) { self.open(self.sae, +first.getAttribute("data-f")); }
      }
    });
    bar.appendChild(this.input);
    this.count = el("span", {"class": "note fb-count"});
    bar.appendChild(this.count);
    root.appendChild(bar);
    var wrap = el("div", {"class": "fb-wrap"});
    var listBox = el("div", {"class": "fb-list"});
    var table = el("table", {"class": "data fb-table"});
    var head = el("tr");
    ["feature", "effect (nats) [95% CI]", "active", "top tokens"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    var thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    this.tbody = el("tbody"); table.appendChild(this.tbody);
    listBox.appendChild(table);
    this.more = el("button", {type: "button", "class": "fb-more"}, "show more");
    this.more.addEventListener("click", function () { self.nShown += 200; self.list(true); });
    listBox.appendChild(this.more);
    wrap.appendChild(listBox);
    this.cardBox = el("div", {"class": "fb-card", id: "fb-card"});
    this.cardBox.appendChild(el("p", {"class": "muted"}, "Pick a feature from the list (or type its number and press Enter) to open its card."));
    wrap.appendChild(this.cardBox);
    root.appendChild(wrap);
    this.list();
  }

  Browser.prototype.matches = function (q) {
    var s = this.data.saes[this.sae];
    if (!q) { return s.rows; }
    q = q.trim().toLowerCase();
    var num = q.replace(/^f/, "");
    if (/^\d+$/.test(num)) {
      var exact = s.rows.filter(function (r) { return String(r[0]) === num; });
      var pre = s.rows.filter(function (r) { return String(r[0]) !== num && String(r[0]).indexOf(num) === 0; });
      return exact.concat(pre);
    }
    return s.rows.filter(function (r) { return r[6] && r[6].toLowerCase().indexOf(q) >= 0; });
  };

  Browser.prototype.list = function (keep) {
    if (!keep) { this.nShown = 60; }
    var self = this;
    var rows = this.matches(this.input.value);
    this.tbody.textContent = "";
    rows.slice(0, this.nShown).forEach(function (r) {
      var tr = el("tr", {"data-f": String(r[0]), tabindex: "0"});
      tr.appendChild(el("td", null, "f" + r[0]));
      tr.appendChild(el("td", null, withCI(r[1], r[2], r[3], 4)));
      tr.appendChild(el("td", null, r[4] === null ? "n/a" : pct(r[4])));
      tr.appendChild(el("td", {"class": "l"}, r[6] || ""));
      if (r[2] !== null && r[2] > 0) { tr.className = "sig"; }
      tr.addEventListener("click", function () { self.open(self.sae, r[0]); });
      tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") { self.open(self.sae, r[0]); } });
      self.tbody.appendChild(tr);
    });
    this.count.textContent = rows.length + " of " + this.data.saes[this.sae].rows.length + " features" +
      (rows.length > this.nShown ? " (first " + this.nShown + " shown)" : "");
    this.more.style.display = rows.length > this.nShown ? "" : "none";
  };

  Browser.prototype.openFromHash = function (id, stay) {
    var m = /^card-sae-(\d+)-f(\d+)$/.exec(id);
    if (!m) { return; }
    var details = document.getElementById("browser-section");
    if (details) { details.open = true; }
    // stay: the card opened where the page starts; its hash is not set either (Chrome scrolls to a fragment that
    // appears while the page is still loading)
    this.open(+m[1], +m[2], stay);
    if (!stay) { this.cardBox.scrollIntoView(); }
  };

  Browser.prototype.open = function (si, k, keepHash) {
    var s = this.data.saes[si];
    if (!s) { return; }
    if (this.select && this.sae !== si) { this.sae = si; this.select.value = String(si); this.list(); }
    var row = null;
    for (var i = 0; i < s.rows.length; i++) { if (s.rows[i][0] === k) { row = s.rows[i]; break; } }
    this.cardBox.textContent = "";
    if (!row) { this.cardBox.appendChild(el("p", {"class": "muted"}, "Feature " + k + " has no recorded evidence in " + s.hook + ".")); return; }
    pending = [];
    var card = buildCard(s, row, s.cards[String(k)] || {}, this.strings);
    this.cardBox.appendChild(card);
    drawPending();
    var trs = this.tbody.querySelectorAll("tr");
    for (var j = 0; j < trs.length; j++) { trs[j].classList.toggle("current", trs[j].getAttribute("data-f") === String(k)); }
    if (history.replaceState && !keepHash) { history.replaceState(null, "", "#card-" + s.sid + "-f" + k); }
  };

  function kv(rows) {
    var t = el("table", {"class": "data"});
    var tb = el("tbody");
    rows.forEach(function (r) {
      if (r[1] === null || r[1] === undefined) { return; }
      var tr = el("tr");
      tr.appendChild(el("td", {"class": "l"}, r[0]));
      tr.appendChild(el("td", null, r[1]));
      tb.appendChild(tr);
    });
    t.appendChild(tb);
    return t;
  }

  function pairsTable(titleA, a, titleB, b, unit, strings) {
    var t = el("table", {"class": "data"});
    var head = el("tr");
    [titleA, unit, titleB, unit].forEach(function (h) { head.appendChild(el("th", null, h)); });
    var thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
    var tb = el("tbody");
    for (var i = 0; i < Math.max(a.length, b.length); i++) {
      var tr = el("tr");
      tr.appendChild(el("td", {"class": "l"}, a[i] ? strings[a[i][0]] : ""));
      tr.appendChild(el("td", null, a[i] ? fmt(a[i][1]) : ""));
      tr.appendChild(el("td", {"class": "l"}, b[i] ? strings[b[i][0]] : ""));
      tr.appendChild(el("td", null, b[i] ? fmt(b[i][1]) : ""));
      tb.appendChild(tr);
    }
    t.appendChild(tb);
    return t;
  }

  var pending = [];  // card plots wait until their card is in the page, so plotly can measure their width

  function plotBox(parent, traces, layout, height) {
    var div = el("div", {"class": "plot card-plot"});
    div.style.height = (height || 260) + "px";
    parent.appendChild(div);
    var lay = Object.assign({margin: {l: 55, r: 15, t: 40, b: 45}, height: height || 260}, layout);
    pending.push(function () { newPlot(div, {data: traces, layout: lay}, CARD_PLOT_CONFIG); });
    return div;
  }

  function drawPending() {
    var todo = pending;
    pending = [];
    todo.forEach(function (f) { f(); });
  }

  function centres(edges) {
    var c = [];
    for (var i = 0; i + 1 < edges.length; i++) { c.push((edges[i] + edges[i + 1]) / 2); }
    return c;
  }

  function buildCard(s, row, c, strings) {
    var k = row[0];
    var box = el("div", {"class": "card", id: "card-" + s.sid + "-f" + k});
    box.appendChild(el("h3", null, "Feature " + k + " of " + s.hook));
    if (c.reading) { box.appendChild(el("p", {"class": "reading"}, c.reading)); }
    var cs = c.cs || {};
    var t = c.top || [];
    box.appendChild(kv([
      ["loss increase when ablated alone at P (nats, 95% CI)", withCI(row[1], row[2], row[3])],
      ["supported (95% CI excludes 0)", row[2] === null ? "undefined" : (row[2] > 0 ? "yes" : "no")],
      ["fraction of prompts where it is active at P", row[4] === null ? null : fmt(row[4], 3)],
      ["mean activation at P when active", row[5] === null ? null : fmt(row[5], 3)],
      ["corpus density (fraction of tokens where it fires)", cs.density === undefined ? null : (cs.density === null ? "n/a" : cs.density.toExponential(2))],
      ["corpus max activation", cs.max === undefined ? null : fmt(cs.max, 3)],
      ["corpus mean activation when active", cs.mwa === undefined ? null : fmt(cs.mwa, 3)],
      ["top-token share", cs.share === undefined ? null : fmt(cs.share, 2)],
      ["circuit node: exact effect / AtP / IG (nats)", c.node ? fmt(c.node[0]) + " / " + fmt(c.node[2]) + " / " + fmt(c.node[3]) + (c.node[4] ? " (in the circuit)" : "") : null],
      ["activation-scaled DLA: mean act x DLA per unit = scaled (logits)", c.sdla ? fmt(c.sdla[0], 3) + " x " + fmt(c.sdla[1], 3) + " = " + fmt(c.sdla[2], 3) : null],
      ["on max-activating stories: global / per position (nats)", c.stories ? withCI(c.stories.global[0], c.stories.global[1], c.stories.global[2]) + " / " + withCI(c.stories.pos[0], c.stories.pos[1], c.stories.pos[2]) : null]
    ]));
    if (c.modes) {
      var mt = [];
      ["residual", "reconstruction", "clean_effect"].forEach(function (m) {
        var v = c.modes[m];
        mt.push(["loss increase, " + m + " ablation (nats)", v ? withCI(v[0], v[1], v[2]) : "n/a"]);
      });
      box.appendChild(kv(mt));
    }
    if (c.sub && c.sub[0] > c.sub[1] && (c.lva || c.dfa || c.pb)) {
      box.appendChild(el("p", {"class": "note"}, "The loss-increase, activation-vs-loss, DFA and boost views use the first " +
        c.sub[1] + " of the " + c.sub[0] + " prompts where this feature is active (task order); the other numbers use all of them."));
    }
    var plots = el("div", {"class": "card-plots"});
    box.appendChild(plots);
    if (cs.hist && cs.hist.length && s.act_edges.length === cs.hist.length + 1) {
      plotBox(plots, [{type: "bar", x: centres(s.act_edges), y: cs.hist, marker: {color: "#d62728"}}],
              {title: {text: "Activation histogram over the corpus"}, xaxis: {title: {text: "log10 activation"}}, yaxis: {title: {text: "tokens"}}});
    }
    if (cs.density !== undefined && cs.density !== null && s.density_counts.length) {
      var ld = cs.density > 0 ? Math.log10(cs.density) : null;
      plotBox(plots, [{type: "bar", x: centres(s.density_edges), y: s.density_counts, marker: {color: "#aec7e8"}, name: "all features"}],
              {title: {text: "Density: this feature among all"}, xaxis: {title: {text: "log10 density"}}, yaxis: {title: {text: "features"}},
               shapes: ld === null ? [] : [{type: "line", x0: ld, x1: ld, yref: "paper", y0: 0, y1: 1, line: {color: "#d62728", width: 3}}], showlegend: false});
    }
    if (c.task && c.task.length) {
      plotBox(plots, [{type: "histogram", x: c.task, marker: {color: "#1f77b4"}, nbinsx: 30}],
              {title: {text: "Activation at P on the task prompts (" + c.task.length + " active)"}, xaxis: {title: {text: "activation"}}, yaxis: {title: {text: "prompts"}}});
    }
    if (c.lva && c.lva.a.length) {
      plotBox(plots, [{type: "histogram", x: c.lva.l, marker: {color: "#9467bd"}, nbinsx: 30}],
              {title: {text: "Loss increase when ablated, per prompt"}, xaxis: {title: {text: "loss increase (nats)"}}, yaxis: {title: {text: "prompts"}}});
      plotBox(plots, [{type: "scatter", mode: "markers", x: c.lva.a, y: c.lva.l, marker: {color: "#d62728", size: 6, opacity: 0.7}}],
              {title: {text: "Activation vs loss increase (r = " + fmt(c.lva.r, 2) + ", n = " + c.lva.a.length + ")"}, xaxis: {title: {text: "activation at P"}}, yaxis: {title: {text: "loss increase (nats)"}}});
    }
    if (c.dfa && c.dfa.labels.length) {
      var err = c.dfa.ci && c.dfa.ci.length === c.dfa.mean.length ? {type: "data", array: c.dfa.ci, visible: true} : undefined;
      plotBox(plots, [{type: "bar", x: c.dfa.labels, y: c.dfa.mean, error_y: err, marker: {color: "#8c564b"}}],
              {title: {text: "DFA: what makes it fire"}, xaxis: {type: "category"}, yaxis: {title: {text: "contribution to pre-activation"}}}, 280);
    }
    if (c.stories && c.stories.values && c.stories.values.length) {
      plotBox(plots, [{type: "histogram", x: c.stories.values, marker: {color: "#ff7f0e"}, nbinsx: 30}],
              {title: {text: "Max-activating stories: loss increase per position"}, xaxis: {title: {text: "loss increase (nats)"}}, yaxis: {title: {text: "positions"}}});
    }
    if (c.pb) {
      box.appendChild(el("h4", null, "Prompt-based log-prob boosts (clean - ablated, nats, over " + (c.pb.n || "?") + " prompts)"));
      box.appendChild(pairsTable("boosted", c.pb.up, "deboosted", c.pb.down, "nats", strings));
    }
    if (c.wb) {
      box.appendChild(el("h4", null, "Weight-based logit boosts (logits per unit activation)"));
      box.appendChild(pairsTable("top", c.wb.up, "bottom", c.wb.down, "logits", strings));
    }
    if (cs.tokens && cs.tokens.length) {
      box.appendChild(el("h4", null, "Tokens it fires on (count above a fraction of its maximum)"));
      box.appendChild(el("p", {"class": "toklist"}, cs.tokens.map(function (p) { return strings[p[0]] + " (" + p[1] + ")"; }).join(", ")));
    }
    var maxAct = cs.max;
    if (c.ex && c.ex.length) {
      box.appendChild(el("h4", null, "Top activating examples (hover a token: activation and position)"));
      c.ex.forEach(function (ex) {
        box.appendChild(el("div", {"class": "note"}, "doc " + ex.d + ", max activation " + fmt(ex.m)));
        box.appendChild(tokensDiv(ex, strings, ex.m, "Activation"));
      });
    }
    if (c.bands) {
      box.appendChild(el("h4", null, "Examples from lower bands of its maximum (colours relative to the corpus maximum)"));
      Object.keys(c.bands).forEach(function (band) {
        c.bands[band].forEach(function (ex) {
          box.appendChild(el("div", {"class": "note"}, band + " band, doc " + ex.d + ", activation " + fmt(ex.m)));
          box.appendChild(tokensDiv(ex, strings, maxAct, "Activation"));
        });
      });
    }
    if (!c.ex && !c.bands && !c.lva && !cs.hist) {
      box.appendChild(el("p", {"class": "muted"}, "Only its exact ablation effect at P was recorded for this feature; " +
        "`saecircuits feature --sae DIR " + k + " --model ... --data ...` writes its full card."));
    }
    return box;
  }

  /* ---------------------------------------------------------------- start */

  function start() {
    if ("IntersectionObserver" in window) {
      observer = new IntersectionObserver(function (entries) {
        entries.forEach(function (en) {
          if (en.isIntersecting) { observer.unobserve(en.target); renderDiv(en.target); }
        });
      }, {rootMargin: "300px"});
    }
    var figsReady = readJSON("sc-figs").then(function (d) {
      if (d) { template = d.template || null; figs = d.figs || {}; }
      watchPlots(document);
    });
    var browserReady = readJSON("sc-browser").then(function (d) {
      var root = document.getElementById("feature-browser");
      if (d && root) {
        browser = new Browser(root, d);
        var want = root.getAttribute("data-open");  // a one-feature page opens its card
        if (want) { browser.openFromHash(want, true); }  // opened where the page starts: no scrolling
      }
    });
    Promise.all([figsReady, browserReady]).then(function () {
      openTarget();
      window.scReport.readyAt = performance.now();  // ms since navigation start (the benchmark reads it)
      document.documentElement.setAttribute("data-ready", "1");
    });
    window.addEventListener("hashchange", openTarget);
    window.scReport = {
      renderAll: renderAll,
      tokenColor: tokenColor,
      nFigures: function () { return Object.keys(figs).length; },
      open: function (si, k) { if (browser) { browser.open(si, k); } }
    };
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
