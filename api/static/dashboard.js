// Draws each widget's chart from the JSON embedded next to its table. The tables are the
// accessible source of the figures; the charts repeat them.
"use strict";

(function () {
  function column(widget, name) {
    const index = widget.columns.indexOf(name);
    return widget.rows.map(function (row) { return row[index]; });
  }

  function percent(values) {
    return values.map(function (value) { return value === null ? null : value * 100; });
  }

  const builders = {
    on_time_rate: function (widget) {
      const key = widget.columns[0];
      return {
        traces: [{ type: "bar", orientation: "h", x: percent(column(widget, "on_time_rate")),
                   y: column(widget, key), name: "On time (%)" }],
        layout: { xaxis: { title: { text: "On time (%)" }, range: [0, 100] },
                  yaxis: { automargin: true, autorange: "reversed" } },
      };
    },
    backlog: function (widget) {
      const x = column(widget, "period");
      return {
        traces: [
          { type: "bar", x: x, y: column(widget, "opened"), name: "Opened" },
          { type: "bar", x: x, y: column(widget, "closed"), name: "Closed" },
          { type: "scatter", mode: "lines+markers", x: x, y: column(widget, "backlog"),
            name: "Open at period end" },
        ],
        layout: { barmode: "group", legend: { orientation: "h" } },
      };
    },
    time_to_close: function (widget) {
      return {
        traces: [{ type: "bar", x: column(widget, "time_to_close"), y: column(widget, "incidents"),
                   name: "Incidents" }],
        layout: { yaxis: { title: { text: "Incidents" } } },
      };
    },
    ranking: function (widget) {
      const key = widget.columns[1];
      return {
        traces: [{ type: "bar", orientation: "h", x: percent(column(widget, "on_time_rate")),
                   y: column(widget, key), name: "On time (%)" }],
        layout: { xaxis: { title: { text: "On time (%)" }, range: [0, 100] },
                  yaxis: { automargin: true, autorange: "reversed" } },
      };
    },
    open_map: function (widget) {
      const sizes = column(widget, "group_open_reports");
      return {
        traces: [{
          type: "scatter", mode: "markers",
          x: column(widget, "longitude"), y: column(widget, "latitude"),
          text: column(widget, "category"),
          marker: { size: sizes.map(function (size) { return 5 + 3 * Math.min(size - 1, 5); }),
                    opacity: 0.6 },
          name: "Open incidents",
        }],
        layout: { xaxis: { title: { text: "Longitude" } },
                  yaxis: { title: { text: "Latitude" }, scaleanchor: "x" } },
      };
    },
  };

  function draw(article) {
    const chart = article.querySelector(".chart");
    const script = article.querySelector("script.widget-data");
    if (!chart || !script || typeof Plotly === "undefined") {
      return;
    }
    const widget = JSON.parse(script.textContent);
    const build = builders[widget.kind];
    if (!build || widget.rows.length === 0) {
      chart.hidden = true;
      return;
    }
    const figure = build(widget);
    const layout = Object.assign(
      { margin: { l: 40, r: 10, t: 10, b: 40 }, height: 320, showlegend: true },
      figure.layout
    );
    Plotly.newPlot(chart, figure.traces, layout, { responsive: true, displayModeBar: false });
  }

  document.querySelectorAll("article.widget").forEach(draw);
  document.documentElement.dataset.chartsDrawn = "true";
})();
