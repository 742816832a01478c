/* Loaded between require.js and the ipywidgets HTML manager (embed-amd.js) on pages that hold widgets
   (nb_ipywidgets_js in _config.yml). Two fixes for a self-contained site:
   1. The manager finds its icon fonts relative to its AMD module's URL, which require.js would resolve against
      the page's folder; point the module at book/_static/vendor/html-manager/ instead.
   2. ipywidgets typesets labels with the MathJax 2 API (MathJax.Hub.Queue), which throws on the site's MathJax 3;
      a two-line bridge to MathJax.typesetPromise. */
(function () {
  "use strict";
  var base = new URL("vendor/html-manager/", document.currentScript.src).href;
  window.__jupyter_widgets_assets_path__ = base;
  if (window.requirejs) {
    window.requirejs.config({paths: {"@jupyter-widgets/html-manager/dist": base.replace(/\/$/, "")}});
  }
  function bridgeMathJax() {
    var mj = window.MathJax;
    if (mj && mj.startup && !mj.Hub) {
      mj.Hub = {
        Queue: function (command) {
          var element = command && command[2];
          mj.startup.promise.then(function () { return element ? mj.typesetPromise([element]) : null; });
        }
      };
    }
  }
  // MathJax is loaded with "defer", so it exists at DOMContentLoaded; the manager renders at "load".
  document.addEventListener("DOMContentLoaded", bridgeMathJax);
})();
