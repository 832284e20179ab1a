{{/*
Names and labels shared by every template.
*/}}

{{- define "dsop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dsop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dsop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that pick the operator pods: never change them, a Deployment's selector is fixed. */}}
{{- define "dsop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dsop.labels" -}}
helm.sh/chart: {{ include "dsop.chart" . }}
{{ include "dsop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: deepseek-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dsop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dsop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator serves; empty means all (only with rbac.scope cluster). */}}
{{- define "dsop.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- join "," (uniq .Values.watchNamespaces) }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* "true" when the replicas elect a leader through kopf peering. */}}
{{- define "dsop.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "dsop.peeringName" -}}
{{- default (include "dsop.fullname" .) .Values.leaderElection.peeringName }}
{{- end }}

{{- define "dsop.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels of the worker pods the operator creates (operator/deepseek_operator/planning/names.py):
managed-by the operator, component worker. */}}
{{- define "dsop.workerLabels" -}}
app.kubernetes.io/managed-by: deepseek-operator
app.kubernetes.io/component: worker
{{- end }}
