-- Argo CD health check for scim.tokenops.dev/ScimDirectory (scim-token-operator), modelled on the
-- one Argo CD ships for cert-manager.io/Certificate: the Ready condition decides, once the operator
-- has caught up with the object (latest generation observed, no rotation request pending).
--
--   no Ready condition                                      Progressing  "Waiting for token"
--   Ready written for an older metadata.generation          Progressing
--   Ready=False, InvalidSpec, SecretConflict,               Degraded     (no token can be issued
--     SecretWriteFailed or IssueDeferred                                  until a human looks)
--   scim.tokenops.dev/rotate != status.lastRotationRequest  Progressing  (rotation pending)
--   Ready=True (TokenIssued, TokenRotated)                  Healthy      (+ "; the previous token is
--                                                                         still valid until T" while
--                                                                         a rotation overlap lasts)
--   Ready=True, IdentityProviderSynced written for an      Progressing
--     older metadata.generation
--   Ready=True, IdentityProviderSynced=False                Progressing  (PushPending, AwaitingSync)
--                                                           or Degraded  (a push step failed)
--   Ready=False, TokenExpired                               Degraded
--   anything else (Ready=Unknown, an unknown reason)        Progressing
--
-- Lua 5.1 base and table libraries and require("os") (date and time) only: Argo CD runs custom
-- checks without the string, math and io libraries unless resource.customizations.useOpenLibs is
-- set, so no string.* and no s:method().
local os = require("os")
local hs = {}

local ready = nil
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
      break
    end
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for token"
  return hs
end

local function describe(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return "Ready=" .. tostring(condition.status) .. " (" .. tostring(condition.reason) .. ")"
end

-- A condition written for an older spec says nothing about the current one. The operator writes the
-- generation it acted on into the condition and into status.observedGeneration. tonumber: numbers
-- may arrive as numbers or as strings.
local generation = tonumber(obj.metadata.generation)
local function observedGeneration(condition)
  local observed = tonumber(condition.observedGeneration)
  if observed == nil then
    observed = tonumber(obj.status.observedGeneration)
  end
  return observed
end
local observed = observedGeneration(ready)
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
    .. " (the status is for generation " .. observed .. ")"
  return hs
end

-- Failures that stop the operator from issuing any token, a requested one included, so they win over
-- a pending rotation request:
--   InvalidSpec, SecretConflict  the spec or someone else's Secret must change;
--   SecretWriteFailed            the API server refuses the Secret write (403/422: RBAC, an admission
--                                policy, an immutable or oversized Secret); retried, but it fails the
--                                same way until a human changes something;
--   IssueDeferred                a repair (or, rarely, a renewal) came within the minimum interval
--                                of the last issue and waits. For a repair the Secret holds no usable
--                                token meanwhile (it was deleted or rewritten), and a deferral
--                                usually means another writer keeps rewriting the Secret: it ends
--                                by itself after the interval, but recurs while that writer runs,
--                                so it is reported, not shown as progress.
if ready.status == "False" and (ready.reason == "InvalidSpec" or ready.reason == "SecretConflict"
    or ready.reason == "SecretWriteFailed" or ready.reason == "IssueDeferred") then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

-- An imperative rotation request (annotation scim.tokenops.dev/rotate) the operator has not handled
-- yet: it records the handled value in status.lastRotationRequest. An empty value is no request.
-- Annotations do not bump metadata.generation, hence this separate check. A pending request also
-- resolves an expired token, so it is checked before TokenExpired.
local request = nil
if obj.metadata.annotations ~= nil then
  request = obj.metadata.annotations["scim.tokenops.dev/rotate"]
end
if request ~= nil and request ~= "" and request ~= obj.status.lastRotationRequest then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to rotate the token (scim.tokenops.dev/rotate=" .. request .. ")"
  return hs
end

-- A directory with an identity provider (spec.identityProvider, docs/entra.md): once the token is
-- Ready, the push to Microsoft Entra ID decides.
--   IdentityProviderSynced=False, PushPending or AwaitingSync  Progressing  (Entra has not run with the
--                                                                         current token yet)
--   IdentityProviderSynced=False, any other reason              Degraded     (a step failed; retried,
--                                                                         the previous token stays
--                                                                         valid until its overlap ends)
--   IdentityProviderSynced=True (Synced), or no such condition  as Ready says
-- A condition written for an older generation (the tenant, the service principal or the base address
-- may have changed since) says nothing about the current spec, whatever its status: Progressing, as
-- for Ready, its observedGeneration read the same way.
local idp = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "IdentityProviderSynced" then
    idp = condition
    break
  end
end
local idpObserved = nil
if idp ~= nil then
  idpObserved = observedGeneration(idp)
end
if ready.status == "True" and generation ~= nil and idpObserved ~= nil and idpObserved < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
    .. " with Microsoft Entra ID (the IdentityProviderSynced condition is for generation " .. idpObserved .. ")"
  return hs
end
if ready.status == "True" and idp ~= nil and idp.status ~= "True" then
  if idp.reason == "PushPending" or idp.reason == "AwaitingSync" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = "Microsoft Entra ID: " .. describe(idp) .. " (" .. tostring(idp.reason) .. ")"
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  -- A rotation overlap (spec.rotationOverlap): the replaced token is still accepted until then. The
  -- status keeps the field after the window, so compare with the clock: both are RFC 3339 UTC
  -- seconds, which order like strings (no string library needed).
  local previousUntil = obj.status.previousTokenValidUntil
  if type(previousUntil) == "string" and previousUntil > os.date("!%Y-%m-%dT%H:%M:%SZ") then
    hs.message = hs.message .. "; the previous token is still valid until " .. previousUntil
  end
  return hs
end

if ready.status == "False" and ready.reason == "TokenExpired" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

-- Ready=Unknown, or Ready=False with a reason this check does not know: not a verdict yet.
hs.status = "Progressing"
hs.message = describe(ready)
return hs
