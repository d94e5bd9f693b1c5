-- Argo CD action "rotate" for scim.tokenops.dev/ScimDirectory: requests one imperative rotation by
-- setting the annotation scim.tokenops.dev/rotate to a new value, the current UTC time in RFC 3339
-- (like kubectl.kubernetes.io/restartedAt of Argo CD's Deployment restart action). The operator
-- rotates once per new value and records it in status.lastRotationRequest.
--
-- GitOps-safe: only that annotation changes, never the spec, so nothing drifts from Git. Lua 5.1
-- base library plus the os.date that Argo CD's restricted os module provides (require("os")).
local os = require("os")

local key = "scim.tokenops.dev/rotate"
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
local current = obj.metadata.annotations[key]
local handled = nil
if obj.status ~= nil then
  handled = obj.status.lastRotationRequest
end

-- The value must differ from the current annotation (two clicks within one second) and from the
-- last handled request (the annotation may have been removed since), or nothing would rotate: then
-- a counter is appended ("...Z-2"). The operator treats the value as opaque.
local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
local value = now
local n = 1
while value == current or value == handled do
  n = n + 1
  value = now .. "-" .. n
end

obj.metadata.annotations[key] = value
return obj
