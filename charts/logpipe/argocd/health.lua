-- ArgoCD health check for logpipe.io/LogPipeline
-- (argocd-cm key: resource.customizations.health.logpipe.io_LogPipeline).
-- ArgoCD's built-in DaemonSet check calls an OnDelete DaemonSet Healthy at once, so the
-- LogPipeline's own status is the truthful health of an agent rollout.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the logpipe operator to report status"
  return hs
end

-- A status written for an older spec says nothing about the current one.
if obj.metadata ~= nil and obj.metadata.generation ~= nil
    and status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end

local message = status.message or ""
local degraded = condition(status, "Degraded")
local phase = status.phase

if phase == "Degraded" or phase == "RollingBack"
    or (degraded ~= nil and degraded.status == "True") then
  hs.status = "Degraded"
  if message == "" and degraded ~= nil then
    message = degraded.message or degraded.reason or ""
  end
elseif phase == "Paused" then
  hs.status = "Suspended"
elseif phase == "Pending" then
  -- Held by a promotion gate (another cluster must be Healthy first).
  hs.status = "Suspended"
elseif phase == "Healthy" then
  local ready = condition(status, "Ready")
  if ready ~= nil and ready.status ~= "True" then
    hs.status = "Progressing"
  else
    hs.status = "Healthy"
  end
else
  hs.status = "Progressing"
end

if message == "" then
  message = "phase " .. tostring(phase)
end
hs.message = message
return hs
