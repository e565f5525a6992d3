// The API docs at /docs: Swagger UI (vendored under vendor/swagger-ui/) on the API's own OpenAPI
// document. A file rather than an inline script, so the page's Content-Security-Policy needs no
// 'unsafe-inline', hash or nonce; the document's address comes from the page, which knows it.
"use strict";

(() => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // Swagger UI's default sends the document to validator.swagger.io for a badge.
    validatorUrl: null,
  });
})();
