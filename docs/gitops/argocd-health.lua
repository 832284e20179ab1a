-- Argo CD health check for llm.dsop.io/DeepSeekDeployment (Lua 5.1, as Argo CD runs it).
-- Maps the status the operator writes to Argo CD's health:
--   no status yet, or status.observedGeneration behind metadata.generation -> Progressing
--   phase Pending, Sharding, Staging, Loading                              -> Progressing
--   phase Ready                                                            -> Healthy
--   phase Degraded (was Ready, lost a worker) and Failed (until the spec changes) -> Degraded
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(status, fallback)
  local msg = status.message
  if msg == nil or msg == "" then
    local ready = condition(status, "Ready")
    if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
      msg = ready.message
    else
      msg = fallback
    end
  end
  if status.readyWorkers ~= nil then
    msg = msg .. " (workers ready: " .. status.readyWorkers .. ")"
  end
  return msg
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the DeepSeekDeployment"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = describe(status, "Serving")
elseif phase == "Pending" or phase == "Sharding" or phase == "Staging" or phase == "Loading" then
  hs.status = "Progressing"
  hs.message = describe(status, phase)
elseif phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = describe(status, "A worker was lost; the operator restarts the worker group")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status, "Failed; fix the spec (see the conditions)")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
