-- One V1 fraud transaction per request: 500 known cards, random amounts and hours.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local cards = {}
for i = 1, 500 do cards[i] = string.format("c_%06d", i * 7) end
request = function()
  local c = cards[math.random(#cards)]
  local amount = string.format("%.2f", math.random() * 200 + 1)
  local body = '{"instances":[{"card_id":"' .. c .. '","amount":' .. amount .. ',"hour":' .. math.random(0, 23) .. ',"cross_border":0,"merchant_category":"grocery","channel":"pos","country":"US"}]}'
  return wrk.format(nil, "/v1/models/fraud:predict", nil, body)
end
