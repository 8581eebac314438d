"""Where the same servers run on other engines, and the manifests that deploy them."""
