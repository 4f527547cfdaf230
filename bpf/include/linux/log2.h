/* empty: bcc includes it; uapi-only programs need nothing from it */
