-- Argo CD action discovery for scim.tokenops.dev/ScimDirectory: one action, "rotate", always
-- enabled. A second request while one is pending is harmless: the operator acts on the latest value,
-- once. RBAC: action/scim.tokenops.dev/ScimDirectory/rotate.
local actions = {}
actions["rotate"] = {
  ["disabled"] = false,
  ["iconClass"] = "fa fa-fw fa-redo",
  ["displayName"] = "Rotate token"
}
return actions
